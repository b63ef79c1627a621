"""Proto <-> domain: requests become validated domain values (every field is hostile until
checked here; each rejection is an InvalidField naming the field and the limit), and domain
enums become their proto spelling."""
from __future__ import annotations

import math

from tokenizers import Tokenizer

from lorafleet.v1 import lorafleet_pb2 as pb
from server.adapters.weights import AdapterKind
from server.config import ServerConfig
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishReason
from server.errors import FailedPrecondition, InvalidArgument, InvalidField
from server.model.chat import ChatTemplate, ChatTemplateError

MAX_REQUEST_ID_CHARS = 128


def sampling_params(p: pb.SamplingParams, cfg: ServerConfig) -> SamplingParams:
    def finite(name: str, v: float, lo: float, hi: float) -> float:
        if not math.isfinite(v) or not lo <= v <= hi:
            raise InvalidField(f"params.{name}", f"params.{name}={v} is out of range [{lo}, {hi}]")
        return float(v)

    n = p.max_new_tokens or cfg.default_new_tokens
    if n > cfg.max_new_tokens:
        raise InvalidField("params.max_new_tokens", f"params.max_new_tokens={n} exceeds this server's limit of {cfg.max_new_tokens}")
    if len(p.stop) > cfg.max_stop_strings:
        raise InvalidField("params.stop", f"params.stop has {len(p.stop)} strings; at most {cfg.max_stop_strings} allowed")
    for s in p.stop:
        if not s or len(s) > cfg.max_stop_string_chars:
            raise InvalidField(
                "params.stop", f"params.stop strings must be 1..{cfg.max_stop_string_chars} characters (got {len(s)})")
    if p.top_k > 100_000:
        raise InvalidField("params.top_k", f"params.top_k={p.top_k} is out of range [0, 100000]")
    return SamplingParams(
        max_new_tokens=n,
        temperature=finite("temperature", p.temperature, 0.0, 100.0),
        top_p=finite("top_p", p.top_p, 0.0, 1.0) or 1.0,
        top_k=int(p.top_k),
        seed=int(p.seed) if p.seed else None,
        stop=tuple(p.stop),
        repetition_penalty=finite("repetition_penalty", p.repetition_penalty, 0.0, 10.0) or 1.0,
        ignore_eos=p.ignore_eos,
    )


def request_id(rid: str) -> str:
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidField("request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters")
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
            field, f"{field} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{cfg.max_context_tokens} tokens; shorten the prompt or ask for fewer tokens")
    return ids


def adapter_kind(value: int) -> AdapterKind | None:
    """UploadMetadata.kind -> the expected kind (None: unspecified, any kind)."""
    if value == pb.ADAPTER_KIND_UNSPECIFIED:
        return None
    name = pb.AdapterKind.Name(value) if value in pb.AdapterKind.values() else ""
    kind = AdapterKind.__members__.get(name.removeprefix("ADAPTER_KIND_"))
    if kind is None:
        raise InvalidField("metadata.kind", f"metadata.kind={value} is not an adapter kind this server knows "
                           f"({', '.join(k.value for k in AdapterKind)})")
    return kind


def kind_to_pb(kind: AdapterKind) -> int:
    return pb.AdapterKind.Value("ADAPTER_KIND_" + kind.value)


def finish_to_pb(reason: FinishReason) -> int:
    return pb.FinishReason.Value("FINISH_REASON_" + reason.name)


def chat_ids(messages, chat: ChatTemplate | None, roles: tuple[str, ...], tokenizer: Tokenizer,
             cfg: ServerConfig, max_new_tokens: int) -> list[int]:
    """GenerateRequest.messages -> prompt token ids, rendered by the model's chat template."""
    if chat is None:
        raise FailedPrecondition("this model has no chat template (no chat_template in its tokenizer_config.json"
                                 " or chat_template.jinja): send `prompt` instead, or serve an instruct model"
                                 " such as the default SmolLM2-135M-Instruct")
    if len(messages) > cfg.max_chat_messages:
        raise InvalidField("messages", f"messages holds {len(messages)} entries; at most {cfg.max_chat_messages}")
    if sum(len(m.content) for m in messages) > cfg.max_prompt_tokens * 64:
        raise InvalidField("messages", f"messages hold far more text than the limit of {cfg.max_prompt_tokens} tokens")
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise InvalidField(f"messages[{i}].role", f"messages[{i}].role {m.role[:40]!r} is not one of this "
                               f"model's chat roles ({', '.join(roles)})")
        if not m.content:
            raise InvalidField(f"messages[{i}].content", f"messages[{i}].content is empty")
    try:
        ids = chat.encode([(m.role, m.content) for m in messages], tokenizer)
    except ChatTemplateError as e:
        raise InvalidArgument(f"the model's chat template refused these messages: {e}") from None
    return _fits(ids, "messages", cfg, max_new_tokens)
