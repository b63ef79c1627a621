"""OpenAI request bodies -> the domain `GenerationRequest` (server/api/requests.py), which the one
generation path validates.

The models are strict (no "5" for 5) and closed: a field this server does not know is a 400 that
names it. OpenAI fields we do not implement (`best_of`, `echo`, `suffix`) are refused unless they
hold their no-op value, so a request never silently means less than it says; `user` is accepted and
ignored (it only labels the caller for abuse tracking). Sampling fields beyond OpenAI's (`top_k`,
`repetition_penalty`, `ignore_eos`, `min_p`, `min_tokens`, named as vLLM names them) reach our
sampler; the SDKs send them with `extra_body`. `logit_bias` keys are token ids written in decimal
(OpenAI's form); `seed: 0` is a seed.

Limits (max tokens, stop strings, prompt length, chat roles) are checked once, by
`server.api.requests.validate`, whose errors name the fields as OpenAI spells them (`OPENAI_FIELDS`).
Two checks come first, because only JSON needs them: every
string must be valid Unicode (JSON's `"\ud800"` decodes to a lone surrogate, which protobuf cannot
encode), and the number of chat messages and stop strings is checked before any entry is built. An
error never echoes more than a short excerpt of what was sent.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from server.adapters.refs import TenantRef
from server.api.requests import FieldNames, GenerationRequest, Sampling
from server.errors import InvalidField

MAX_U32 = (1 << 32) - 1
MAX_SEED = (1 << 63) - 1
SHOWN_CHARS = 60                     # the longest excerpt of a value an error message quotes
# OpenAI fields this server does not implement: accepted only with the value that changes nothing
NO_OP: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
}
# how the domain request's fields are spelled in OpenAI's bodies (the names errors give)
OPENAI_FIELDS = FieldNames("prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                           "repetition_penalty", "request_id")
TOKEN_ID = re.compile(r"[0-9]{1,10}")          # a logit_bias key: a token id in decimal


def _unicode(text: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PydanticCustomError("unicode", "holds a lone surrogate at index {index}, which is not Unicode "
                                      "text; send UTF-8 text", {"index": err.start}) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]     # every string of a body


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Text
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: Text
    max_tokens: int | None = Field(None, ge=1, le=MAX_U32)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None                      # accepted, ignored
    n: int | None = Field(None, ge=1, le=MAX_U32)
    presence_penalty: float | None = None         # ranges: checked once, in requests.validate
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    # lorafleet's sampler, beyond OpenAI's fields (vLLM's names)
    top_k: int | None = Field(None, ge=0, le=MAX_U32)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_p: float | None = None
    min_tokens: int | None = Field(None, ge=0, le=MAX_U32)

    @model_validator(mode="after")
    def _no_ops_only(self) -> "_Request":
        for name, allowed in NO_OP.items():
            value = getattr(self, name, None)
            if value not in allowed:
                shown = " or ".join(repr(a) for a in allowed if a is not None)
                raise InvalidField(name, f"{name}={_shown(value)} is not supported by this server "
                                         f"(accepted only as {shown}, which changes nothing)")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def new_tokens(self) -> int:
        return self.max_tokens or 0

    def top_logprobs_k(self) -> int | None:
        """None: no logprobs; k: the sampled token's logprob and the k most likely."""
        return None

    def sampling(self) -> Sampling:
        """OpenAI's defaults: temperature 1 and top_p 1 when left out (send temperature 0 for greedy);
        max_tokens left out takes the server's --default-new-tokens."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_new_tokens=self.new_tokens(), temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0, top_k=self.top_k or 0, seed=self.seed, stop=stop,
            repetition_penalty=self.repetition_penalty or 0.0, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            min_p=self.min_p or 0.0, min_tokens=self.min_tokens or 0, logit_bias=self._logit_bias(),
            logprobs=self.top_logprobs_k(), n=self.n or 1)

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        out = []
        for key, value in (self.logit_bias or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise InvalidField("logit_bias", f"logit_bias key {_shown(key)} is not a token id (a decimal "
                                                 "integer such as \"50256\")")
            out.append((int(key), value))
        return tuple(out)

    def fields(self) -> FieldNames:
        return OPENAI_FIELDS


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_U32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_U32)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise InvalidField("top_logprobs", f"top_logprobs={self.top_logprobs} needs logprobs: true")
        return self

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 0

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def fields(self) -> FieldNames:
        return replace(OPENAI_FIELDS, logprobs="top_logprobs",
                       max_new_tokens="max_completion_tokens" if self.max_completion_tokens is not None
                       else OPENAI_FIELDS.max_new_tokens)

    def to_domain(self, adapter: TenantRef | None) -> GenerationRequest:
        return GenerationRequest(self.sampling(), messages=tuple((m.role, m.text()) for m in self.messages),
                                 adapter=adapter, fields=self.fields())


class CompletionRequest(_Request):
    prompt: Text | list[Text]
    logprobs: int | None = Field(None, ge=0, le=MAX_U32)
    echo: bool | None = None
    best_of: int | None = None
    suffix: Text | None = None

    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    def to_domain(self, adapter: TenantRef | None) -> GenerationRequest:
        """A list of prompts: n choices each, indexed prompt * n + choice as OpenAI does."""
        prompt = tuple(self.prompt) if isinstance(self.prompt, list) else self.prompt
        return GenerationRequest(self.sampling(), prompt=prompt, adapter=adapter, fields=self.fields())


def parse(model: type[_Request], doc: object, max_entries: dict[str, int]) -> _Request:
    """Validate a decoded JSON body; InvalidField names the first offending field. A list field
    named in `max_entries` (messages: --max-chat-messages, stop: --max-stop-strings) that holds
    more is refused before any of its entries is built."""
    if not isinstance(doc, dict):
        raise InvalidField("body", "the request body must be a JSON object")
    for name, limit in max_entries.items():
        value = doc.get(name)
        if name in model.model_fields and isinstance(value, (list, dict)) and len(value) > limit:
            raise InvalidField(name, f"{name} holds {len(value)} entries; at most {limit}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        # of a union's alternatives, the error that got furthest into the value says most
        raise _field_error(max(e.errors(include_url=False), key=lambda err: len(err["loc"]))) from None


def _field_error(err: dict) -> InvalidField:
    path = _path(err["loc"])
    if err["type"] == "extra_forbidden":
        return InvalidField(path, f"unknown field {path!r}: this server does not implement it "
                                  "(see the README's OpenAI section for the fields it accepts)")
    if err["type"] == "missing":
        return InvalidField(path, f"{path} is required")
    return InvalidField(path, f"{path}: {err['msg']} (got {_shown(err.get('input'))})")


def _path(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += ("." if out else "") + (part if len(part) <= SHOWN_CHARS else part[:SHOWN_CHARS - 1] + "…")
    return out or "body"


def _shown(value: object) -> str:
    """A short excerpt of a value for an error message (repr: a lone surrogate is shown escaped)."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) <= 8 else \
        f"{type(value).__name__} of {len(value)} entries"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"
