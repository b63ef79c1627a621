"""The domain request: what a caller asked the generation path for. Each door builds it from its own
wire format (gRPC: `server/api/convert.py`; HTTP: `server/http/schema.py`) and `validate` checks it
once, here. Every field is hostile until checked; each rejection is an InvalidField naming the field
in the caller's own spelling (`FieldNames`: proto paths on gRPC, OpenAI names on HTTP) and the limit.

A request asks for `n` choices of each of its prompts (several prompts: /v1/completions only), each
its own sequence; choice i of a seeded request is seeded with seed + i (mod 2^64), so a prompt's
choices are the same whether it comes alone or in a list. The `developer` role is rendered as
`system` unless the chat template names it, and the `tool` role as a `user` message that says it
holds a function's result.

A request may constrain its output (issue 23): `constraint` (a JSON schema, any JSON object, a regex
or a grammar), named in errors by `constraint_field` in the caller's spelling; and a chat may offer
tools (`server.api.tools`), which reach the prompt here, and which force a call through a JSON-schema
constraint when tool_choice is `required` or a function. The constraint is compiled by the
generation path (`Generation.submit`), after these checks and before anything is queued.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tokenizers import Tokenizer

from server.adapters.refs import TenantRef
from server.api import tools as tool_calls
from server.api.tools import Tools
from server.config import ServerConfig
from server.engine.constraints import Constraint
from server.engine.sampling import SamplingParams
from server.errors import FailedPrecondition, InvalidArgument, InvalidField
from server.model.chat import DEVELOPER, TOOL, ChatTemplate, ChatTemplateError

MAX_REQUEST_ID_CHARS = 128
MAX_TOP_K = 100_000
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_PENALTY = 2.0               # presence_penalty, frequency_penalty: OpenAI's range [-2, 2]
MAX_LOGIT_BIAS = 100.0          # a logit_bias value: OpenAI's range [-100, 100]
SEED_MOD = 1 << 64


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
    presence_penalty: str = "presence_penalty"
    frequency_penalty: str = "frequency_penalty"
    min_p: str = "min_p"
    min_tokens: str = "min_tokens"
    logit_bias: str = "logit_bias"
    logprobs: str = "logprobs"          # the field holding how many top logprobs (chat: top_logprobs)
    n: str = "n"


GRPC_FIELDS = FieldNames("prompt", "messages", "params.max_new_tokens", "params.temperature", "params.top_p",
                         "params.top_k", "params.seed", "params.stop", "params.repetition_penalty", "request_id",
                         "params.presence_penalty", "params.frequency_penalty", "params.min_p", "params.min_tokens",
                         "params.logit_bias", "params.top_logprobs", "params.n")


@dataclass(frozen=True)
class Sampling:
    """The sampling fields as sent; 0 or empty means the server's default (max_new_tokens) or off."""
    max_new_tokens: int = 0
    temperature: float = 0.0              # 0 = greedy
    top_p: float = 0.0                    # 0 (or 1) = off
    top_k: int = 0                        # 0 = off
    seed: int | None = None               # None = the server picks one (0 is a seed)
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 0.0       # 0 (or 1) = off
    ignore_eos: bool = False
    presence_penalty: float = 0.0         # 0 = off
    frequency_penalty: float = 0.0        # 0 = off
    min_p: float = 0.0                    # 0 = off
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias) as sent
    logprobs: int | None = None           # None = off; k = the sampled token's logprob and the top k
    n: int = 1                            # choices per prompt (0 = 1)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation call: a prompt (or a list of prompts), or chat messages (role, content), on
    the base model or an adapter (already parsed in the caller's namespace), not yet validated."""
    sampling: Sampling
    prompt: str | tuple[str, ...] = ""
    messages: tuple[tuple[str, str], ...] = ()
    adapter: TenantRef | None = None
    request_id: str = ""
    fields: FieldNames = GRPC_FIELDS
    constraint: Constraint | None = None      # what the output must match, or None (free text)
    constraint_field: str = ""                # the field that holds it, as the caller spells it
    tools: Tools | None = None                # chat only


@dataclass(frozen=True)
class ValidRequest:
    """A GenerationRequest that passed `validate`: what the engine gets, `n` sequences per prompt."""
    prompts: tuple[list[int], ...]        # each prompt's tokens (chat: one, rendered by the template)
    params: SamplingParams                # choice 0's; `choice_params` gives the others'
    request_id: str                       # '' when the caller sent none
    stop_ids: frozenset[int]              # end-of-turn tokens of a chat
    n: int = 1                            # choices per prompt
    constraint: Constraint | None = None  # to compile before queueing (the request's, or the tools')
    constraint_field: str = ""

    @property
    def ids(self) -> list[int]:
        """The first (for a chat or a single prompt: the only) prompt's tokens."""
        return self.prompts[0]


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice `choice`'s parameters: seed + choice when seeded (each unseeded choice draws its own)."""
    if choice == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + choice) % SEED_MOD)


def validate(req: GenerationRequest, cfg: ServerConfig, tokenizer: Tokenizer, chat: ChatTemplate | None,
             roles: tuple[str, ...], vocab_size: int | None = None) -> ValidRequest:
    """`vocab_size`: token ids below it may take a logit_bias (default: the tokenizer's vocabulary)."""
    f = req.fields
    vocab = vocab_size if vocab_size is not None else tokenizer.get_vocab_size(with_added_tokens=True)
    params = sampling_params(req.sampling, cfg, f, vocab)
    n = choices(req.sampling.n, cfg, f)
    rid = request_id(req.request_id, f.request_id)
    constraint, cfield = req.constraint, req.constraint_field
    if req.tools is not None:
        tool_calls.check(req.tools, cfg)
        forced = tool_calls.constraint(req.tools)
        if forced is not None:
            if constraint is not None:
                raise InvalidField(cfield, f"{cfield} cannot be combined with tool_choice "
                                           f"{req.tools.choice!r}, which constrains the reply to a tool call")
            constraint, cfield = forced, "tools"
    if req.messages:
        if req.prompt:
            raise InvalidArgument(f"send either {f.prompt} or {f.messages}, not both")
        ids = chat_ids(req.messages, chat, roles, tokenizer, cfg, params.max_new_tokens, f.messages, req.tools)
        return ValidRequest((ids,), params, rid, chat.end_of_turn_ids, n, constraint, cfield)
    if req.tools is not None:
        raise InvalidField("tools", f"tools need {f.messages} (a chat)")
    if isinstance(req.prompt, str):
        return ValidRequest((prompt_ids(req.prompt, tokenizer, cfg, params.max_new_tokens, f.prompt),), params,
                            rid, frozenset(), n, constraint, cfield)
    if not req.prompt:
        raise InvalidField(f.prompt, f"{f.prompt} is an empty list; send at least one prompt")
    if len(req.prompt) * n > cfg.max_choices:
        raise InvalidField(f.prompt, f"{f.prompt} holds {len(req.prompt)} prompts of {n} choices each; this "
                                     f"server starts at most {cfg.max_choices} sequences per request")
    return ValidRequest(tuple(prompt_ids(p, tokenizer, cfg, params.max_new_tokens, f"{f.prompt}[{i}]")
                              for i, p in enumerate(req.prompt)), params, rid, frozenset(), n, constraint, cfield)


def choices(n: int, cfg: ServerConfig, f: FieldNames = GRPC_FIELDS) -> int:
    n = n or 1
    limit = min(cfg.max_n, cfg.max_choices)
    if not 1 <= n <= limit:
        raise InvalidField(f.n, f"{f.n}={n} is out of range [1, {limit}] (choices per prompt)")
    return n


def sampling_params(s: Sampling, cfg: ServerConfig, f: FieldNames, vocab_size: int) -> SamplingParams:
    def in_range(name: str, v: float, lo: float, hi: float) -> float:
        if not math.isfinite(v) or not lo <= v <= hi:
            raise InvalidField(name, f"{name}={v} is out of range [{lo}, {hi}]")
        return float(v)

    n = s.max_new_tokens or cfg.default_new_tokens
    if n > cfg.max_new_tokens:
        raise InvalidField(f.max_new_tokens, f"{f.max_new_tokens}={n} exceeds this server's limit of "
                                             f"{cfg.max_new_tokens}")
    if not 0 <= s.min_tokens <= n:
        raise InvalidField(f.min_tokens, f"{f.min_tokens}={s.min_tokens} is out of range [0, {n}] (at most "
                                         f"{f.max_new_tokens})")
    if s.logprobs is not None and not 0 <= s.logprobs <= cfg.max_top_logprobs:
        raise InvalidField(f.logprobs, f"{f.logprobs}={s.logprobs} is out of range [0, {cfg.max_top_logprobs}]")
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
        seed=int(s.seed) if s.seed is not None else None,
        stop=tuple(s.stop),
        repetition_penalty=in_range(f.repetition_penalty, s.repetition_penalty, 0.0, MAX_REPETITION_PENALTY) or 1.0,
        ignore_eos=s.ignore_eos,
        presence_penalty=in_range(f.presence_penalty, s.presence_penalty, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=in_range(f.frequency_penalty, s.frequency_penalty, -MAX_PENALTY, MAX_PENALTY),
        min_p=in_range(f.min_p, s.min_p, 0.0, 1.0),
        min_tokens=int(s.min_tokens),
        logit_bias=logit_bias(s.logit_bias, cfg, f.logit_bias, vocab_size),
        logprobs=s.logprobs,
    )


def logit_bias(bias: tuple[tuple[int, float], ...], cfg: ServerConfig, field: str,
               vocab_size: int) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs: at most cfg.max_logit_bias, ids distinct and in the vocabulary,
    biases finite in [-100, 100]; sorted by id."""
    if len(bias) > cfg.max_logit_bias:
        raise InvalidField(field, f"{field} holds {len(bias)} entries; at most {cfg.max_logit_bias}")
    out: dict[int, float] = {}
    for token, value in bias:
        if not 0 <= token < vocab_size:
            raise InvalidField(field, f"{field}: {token} is not a token id of this model (0..{vocab_size - 1})")
        if token in out:
            raise InvalidField(field, f"{field}: token {token} is given twice")
        if not math.isfinite(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidField(field, f"{field}[{token}]={value} is out of range [-100, 100]")
        out[token] = float(value)
    return tuple(sorted(out.items()))


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
             tokenizer: Tokenizer, cfg: ServerConfig, max_new_tokens: int, field: str = "messages",
             tools: Tools | None = None) -> list[int]:
    """(role, content) pairs -> prompt token ids (`render_chat`) that fit the context with
    `max_new_tokens` more."""
    return _fits(render_chat(messages, chat, roles, tokenizer, cfg, field, tools), field, cfg, max_new_tokens)


def render_chat(messages: tuple[tuple[str, str], ...], chat: ChatTemplate | None, roles: tuple[str, ...],
                tokenizer: Tokenizer, cfg: ServerConfig, field: str = "messages",
                tools: Tools | None = None) -> list[int]:
    """(role, content) pairs -> token ids, rendered by the model's chat template (the count
    first, before any per-message work), with the tools offered (server.api.tools: the
    template's own rendering, or the fallback's system block); no limit on the result's length."""
    if chat is None:
        raise FailedPrecondition("this model has no chat template (no chat_template in its tokenizer_config.json"
                                 " or chat_template.jinja): send a prompt instead, or serve an instruct model"
                                 " such as the default SmolLM2-135M-Instruct")
    if len(messages) > cfg.max_chat_messages:
        raise InvalidField(field, f"{field} holds {len(messages)} entries; at most {cfg.max_chat_messages}")
    if sum(len(content) for _, content in messages) > cfg.max_prompt_tokens * 64:
        raise InvalidField(field, f"{field} hold far more text than the limit of {cfg.max_prompt_tokens} tokens")
    rendered = []
    for i, (role, content) in enumerate(messages):
        if role == DEVELOPER and role not in roles and "system" in roles:
            role = "system"                 # OpenAI's newer name for it, where the template has no such role
        if role == TOOL and role not in roles and "user" in roles:
            role, content = "user", tool_calls.tool_result(content)
        if role not in roles:
            raise InvalidField(f"{field}[{i}].role", f"{field}[{i}].role {role[:40]!r} is not one of this "
                               f"model's chat roles ({', '.join(roles)}{', developer' * ('system' in roles)})")
        if not content:
            raise InvalidField(f"{field}[{i}].content", f"{field}[{i}].content is empty")
        rendered.append((role, content))
    native = None
    if tools is not None and tools.active:
        if chat.supports_tools:
            native = [t.openai() for t in tools.tools]
        else:
            rendered = tool_calls.with_system_block(rendered, tools, "system" if "system" in roles else None)
    try:
        return chat.encode(rendered, tokenizer, native)
    except ChatTemplateError as e:
        raise InvalidArgument(f"the model's chat template refused these messages: {e}") from None
