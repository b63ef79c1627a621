"""The domain request: what a caller asked the generation path for. Each door builds it from its own
wire format (gRPC: `server/api/convert.py`; HTTP: `server/http/schema.py`) and `validate` checks it
once, here. Every field is hostile until checked; each rejection is an InvalidField naming the field
in the caller's own spelling (`FieldNames`: proto paths on gRPC, OpenAI names on HTTP) and the limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tokenizers import Tokenizer

from server.adapters.refs import TenantRef
from server.config import ServerConfig
from server.engine.sampling import SamplingParams
from server.errors import FailedPrecondition, InvalidArgument, InvalidField
from server.model.chat import ChatTemplate, ChatTemplateError

MAX_REQUEST_ID_CHARS = 128
MAX_TOP_K = 100_000
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class FieldNames:
    """How a door spells each field of the domain request in its errors."""
    prompt: str
    messages: str
    max_new_tokens: str
    temperature: str
    top_p: str
    top_k: str
    seed: str
    stop: str
    repetition_penalty: str
    request_id: str


GRPC_FIELDS = FieldNames("prompt", "messages", "params.max_new_tokens", "params.temperature", "params.top_p",
                         "params.top_k", "params.seed", "params.stop", "params.repetition_penalty", "request_id")


@dataclass(frozen=True)
class Sampling:
    """The sampling fields as sent; 0 or empty means the server's default (max_new_tokens) or off."""
    max_new_tokens: int = 0
    temperature: float = 0.0              # 0 = greedy
    top_p: float = 0.0                    # 0 (or 1) = off
    top_k: int = 0                        # 0 = off
    seed: int = 0                         # 0 = the server picks one
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 0.0       # 0 (or 1) = off
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One generation call: a prompt, or chat messages (role, content), on the base model or an
    adapter (already parsed in the caller's namespace), not yet validated."""
    sampling: Sampling
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    adapter: TenantRef | None = None
    request_id: str = ""
    fields: FieldNames = GRPC_FIELDS


@dataclass(frozen=True)
class ValidRequest:
    """A GenerationRequest that passed `validate`: what the engine gets."""
    ids: list[int]                        # the prompt's tokens (chat: rendered by the template)
    params: SamplingParams
    request_id: str                       # '' when the caller sent none
    stop_ids: frozenset[int]              # end-of-turn tokens of a chat


def validate(req: GenerationRequest, cfg: ServerConfig, tokenizer: Tokenizer, chat: ChatTemplate | None,
             roles: tuple[str, ...]) -> ValidRequest:
    f = req.fields
    params = sampling_params(req.sampling, cfg, f)
    rid = request_id(req.request_id, f.request_id)
    if req.messages:
        if req.prompt:
            raise InvalidArgument(f"send either {f.prompt} or {f.messages}, not both")
        ids = chat_ids(req.messages, chat, roles, tokenizer, cfg, params.max_new_tokens, f.messages)
        return ValidRequest(ids, params, rid, chat.end_of_turn_ids)
    return ValidRequest(prompt_ids(req.prompt, tokenizer, cfg, params.max_new_tokens, f.prompt), params, rid,
                        frozenset())


def sampling_params(s: Sampling, cfg: ServerConfig, f: FieldNames = GRPC_FIELDS) -> SamplingParams:
    def in_range(name: str, v: float, lo: float, hi: float) -> float:
        if not math.isfinite(v) or not lo <= v <= hi:
            raise InvalidField(name, f"{name}={v} is out of range [{lo}, {hi}]")
        return float(v)

    n = s.max_new_tokens or cfg.default_new_tokens
    if n > cfg.max_new_tokens:
        raise InvalidField(f.max_new_tokens, f"{f.max_new_tokens}={n} exceeds this server's limit of "
                                             f"{cfg.max_new_tokens}")
    if len(s.stop) > cfg.max_stop_strings:
        raise InvalidField(f.stop, f"{f.stop} has {len(s.stop)} strings; at most {cfg.max_stop_strings} allowed")
    for stop in s.stop:
        if not stop or len(stop) > cfg.max_stop_string_chars:
            raise InvalidField(f.stop, f"{f.stop} strings must be 1..{cfg.max_stop_string_chars} characters "
                                       f"(got {len(stop)})")
    if not 0 <= s.top_k <= MAX_TOP_K:
        raise InvalidField(f.top_k, f"{f.top_k}={s.top_k} is out of range [0, {MAX_TOP_K}]")
    return SamplingParams(
        max_new_tokens=n,
        temperature=in_range(f.temperature, s.temperature, 0.0, MAX_TEMPERATURE),
        top_p=in_range(f.top_p, s.top_p, 0.0, 1.0) or 1.0,
        top_k=int(s.top_k),
        seed=int(s.seed) if s.seed else None,
        stop=tuple(s.stop),
        repetition_penalty=in_range(f.repetition_penalty, s.repetition_penalty, 0.0, MAX_REPETITION_PENALTY) or 1.0,
        ignore_eos=s.ignore_eos,
    )


def request_id(rid: str, field: str = "request_id") -> str:
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidField(field, f"{field} must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return rid


def prompt_ids(prompt: str, tokenizer: Tokenizer, cfg: ServerConfig, max_new_tokens: int,
               field: str = "prompt") -> list[int]:
    if not prompt:
        raise InvalidField(field, f"{field} is empty")
    # bytes before tokens: a prompt can never be shorter in tokens than in bytes / 64
    if len(prompt) > cfg.max_prompt_tokens * 64:
        raise InvalidField(field, f"{field} is {len(prompt)} characters; far above the limit of "
                              f"{cfg.max_prompt_tokens} tokens")
    return _fits(tokenizer.encode(prompt).ids, field, cfg, max_new_tokens)


def _fits(ids: list[int], field: str, cfg: ServerConfig, max_new_tokens: int) -> list[int]:
    if len(ids) > cfg.max_prompt_tokens:
        raise InvalidField(field, f"{field} is {len(ids)} tokens; this server accepts at most "
                              f"{cfg.max_prompt_tokens} (context {cfg.max_context_tokens} tokens)")
    if len(ids) + max_new_tokens > cfg.max_context_tokens:
        raise InvalidField(
            field, f"{field} ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the context of "
            f"{cfg.max_context_tokens} tokens; shorten the prompt or ask for fewer tokens")
    return ids


def chat_ids(messages: tuple[tuple[str, str], ...], chat: ChatTemplate | None, roles: tuple[str, ...],
             tokenizer: Tokenizer, cfg: ServerConfig, max_new_tokens: int, field: str = "messages") -> list[int]:
    """(role, content) pairs -> prompt token ids (`render_chat`) that fit the context with
    `max_new_tokens` more."""
    return _fits(render_chat(messages, chat, roles, tokenizer, cfg, field), field, cfg, max_new_tokens)


def render_chat(messages: tuple[tuple[str, str], ...], chat: ChatTemplate | None, roles: tuple[str, ...],
                tokenizer: Tokenizer, cfg: ServerConfig, field: str = "messages") -> list[int]:
    """(role, content) pairs -> token ids, rendered by the model's chat template (the count
    first, before any per-message work); no limit on the result's length."""
    if chat is None:
        raise FailedPrecondition("this model has no chat template (no chat_template in its tokenizer_config.json"
                                 " or chat_template.jinja): send a prompt instead, or serve an instruct model"
                                 " such as the default SmolLM2-135M-Instruct")
    if len(messages) > cfg.max_chat_messages:
        raise InvalidField(field, f"{field} holds {len(messages)} entries; at most {cfg.max_chat_messages}")
    if sum(len(content) for _, content in messages) > cfg.max_prompt_tokens * 64:
        raise InvalidField(field, f"{field} hold far more text than the limit of {cfg.max_prompt_tokens} tokens")
    for i, (role, content) in enumerate(messages):
        if role not in roles:
            raise InvalidField(f"{field}[{i}].role", f"{field}[{i}].role {role[:40]!r} is not one of this "
                               f"model's chat roles ({', '.join(roles)})")
        if not content:
            raise InvalidField(f"{field}[{i}].content", f"{field}[{i}].content is empty")
    try:
        return chat.encode(list(messages), tokenizer)
    except ChatTemplateError as e:
        raise InvalidArgument(f"the model's chat template refused these messages: {e}") from None
