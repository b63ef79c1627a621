"""OpenAI request bodies -> the domain `GenerationRequest` (server/api/requests.py), which the one
generation path validates.

The models are strict (no "5" for 5) and closed: a field this server does not know is a 400 that
names it. OpenAI fields we do not implement (`best_of`, `echo`, `suffix`) are refused unless they
hold their no-op value, so a request never silently means less than it says; `user` is accepted and
ignored (it only labels the caller for abuse tracking). Sampling fields beyond OpenAI's (`top_k`,
`repetition_penalty`, `ignore_eos`, `min_p`, `min_tokens`, named as vLLM names them) reach our
sampler; the SDKs send them with `extra_body`. `logit_bias` keys are token ids written in decimal
(OpenAI's form); `seed: 0` is a seed.

Structured output (issue 23): chat's `response_format` (`text`, `json_object`, `json_schema` with
`json_schema.schema`), and on both routes vLLM's `structured_outputs` (`json`, `regex`, `grammar`,
`choice`, `json_object`) and its older `guided_json` / `guided_regex` / `guided_grammar` /
`guided_choice`: at most one of them per request, each a domain `Constraint` whose errors name the
field as sent (`response_format.json_schema.schema`, `structured_outputs.regex`, `guided_json`, ...).
A `choice` list becomes a Lark grammar of its strings. Chat's `tools`, `tool_choice` and
`parallel_tool_calls` become the domain `Tools` (server/api/tools.py); assistant messages may carry
`tool_calls` (content then optional) and `tool` messages a `tool_call_id`.

Limits (max tokens, stop strings, prompt length, chat roles) are checked once, by
`server.api.requests.validate`, whose errors name the fields as OpenAI spells them (`OPENAI_FIELDS`).
Two checks come first, because only JSON needs them: every
string must be valid Unicode (JSON's `"\ud800"` decodes to a lone surrogate, which protobuf cannot
encode), and the number of chat messages and stop strings is checked before any entry is built. An
error never echoes more than a short excerpt of what was sent.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from server.adapters.refs import TenantRef
from server.api import tools as tool_calls
from server.api.requests import FieldNames, GenerationRequest, Sampling
from server.api.tools import Tool, Tools
from server.engine.constraints import Constraint
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


class FunctionCall(_Strict):
    name: Text
    arguments: Text = "{}"                 # JSON text, as OpenAI sends it


class ToolCallMessage(_Strict):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Text
    tool_calls: list[ToolCallMessage] | None = None    # an assistant's calls (before content: its check reads them)
    content: Text | list[TextPart] | None = Field(None, validate_default=True)
    tool_call_id: Text | None = None                   # a tool message: the call it answers
    name: Text | None = None                           # accepted, not rendered

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, value, info: ValidationInfo):
        if value is None and not info.data.get("tool_calls"):
            raise PydanticCustomError("missing", "Field required (only an assistant message with tool_calls may "
                                      "leave it out)")
        return value

    def text(self) -> str:
        if self.content is None:
            text = ""
        else:
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        if self.tool_calls:
            calls = tool_calls.calls_as_text([(c.function.name, c.function.arguments) for c in self.tool_calls])
            text = f"{text}\n{calls}" if text else calls
        return text


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of its fields."""
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    grammar: Text | None = None
    choice: list[Text] | None = None
    json_object: bool | None = None


class FunctionDef(_Strict):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def _schema_text(value: dict | str) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _choice_grammar(field: str, options: list[str]) -> Constraint:
    """A `choice` list -> a Lark grammar whose only sentences are its strings."""
    if not options or any(not o for o in options):
        raise InvalidField(field, f"{field} must hold at least one string, none of them empty")
    return Constraint("grammar", "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))


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
    # structured output (vLLM's names; chat adds OpenAI's response_format)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_grammar: Text | None = None
    guided_choice: list[Text] | None = None

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

    def constraints(self) -> list[tuple[str, Constraint]]:
        """(field as sent, constraint) of every structured-output field set."""
        out: list[tuple[str, Constraint]] = []
        so = self.structured_outputs
        if so is not None:
            set_ = [(n, v) for n, v in (("json", so.json_), ("regex", so.regex), ("grammar", so.grammar),
                                        ("choice", so.choice), ("json_object", so.json_object or None))
                    if v is not None]
            if len(set_) != 1:
                raise InvalidField("structured_outputs", "structured_outputs must set exactly one of json, regex, "
                                                         f"grammar, choice, json_object (got {len(set_)})")
            name, value = set_[0]
            field = f"structured_outputs.{name}"
            out.append((field, {"json": lambda: Constraint("json_schema", _schema_text(value)),
                                "regex": lambda: Constraint("regex", value),
                                "grammar": lambda: Constraint("grammar", value),
                                "choice": lambda: _choice_grammar(field, value),
                                "json_object": lambda: Constraint("json_object")}[name]()))
        if self.guided_json is not None:
            out.append(("guided_json", Constraint("json_schema", _schema_text(self.guided_json))))
        if self.guided_regex is not None:
            out.append(("guided_regex", Constraint("regex", self.guided_regex)))
        if self.guided_grammar is not None:
            out.append(("guided_grammar", Constraint("grammar", self.guided_grammar)))
        if self.guided_choice is not None:
            out.append(("guided_choice", _choice_grammar("guided_choice", self.guided_choice)))
        return out

    def constraint(self) -> dict:
        """The domain request's constraint fields: at most one structured-output field may be set."""
        found = self.constraints()
        if len(found) > 1:
            raise InvalidField(found[1][0], f"{found[1][0]} and {found[0][0]} both constrain the output; send one")
        return {"constraint": found[0][1], "constraint_field": found[0][0]} if found else {}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_U32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_U32)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise InvalidField("top_logprobs", f"top_logprobs={self.top_logprobs} needs logprobs: true")
        return self

    def constraints(self) -> list[tuple[str, Constraint]]:
        rf, out = self.response_format, []
        if rf is not None and rf.type == "json_object":
            out.append(("response_format", Constraint("json_object")))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                out.append(("response_format.json_schema", Constraint("json_object")))
            else:
                out.append(("response_format.json_schema.schema",
                            Constraint("json_schema", json.dumps(rf.json_schema.schema_))))
        return out + super().constraints()

    def domain_tools(self) -> Tools | None:
        """The tools offered (None: none, and no tool_choice)."""
        if self.tools is None and self.tool_choice is None:
            return None
        choice = self.tool_choice or ("auto" if self.tools else "none")
        named = ""
        if isinstance(choice, NamedToolChoice):
            choice, named = "function", choice.function.name
        return Tools(tuple(Tool(t.function.name, t.function.description or "",
                                json.dumps(t.function.parameters) if t.function.parameters is not None else "")
                           for t in self.tools or ()), choice, named,
                     self.parallel_tool_calls if self.parallel_tool_calls is not None else True)

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
                                 adapter=adapter, fields=self.fields(), tools=self.domain_tools(), **self.constraint())


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
        return GenerationRequest(self.sampling(), prompt=prompt, adapter=adapter, fields=self.fields(),
                                 **self.constraint())


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
