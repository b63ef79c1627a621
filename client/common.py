"""What the sync and async clients share: request builders, result types, retry policy, TLS
credentials and call metadata. grpcio and protobuf only."""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lorafleet.archive import DirArchive
from lorafleet.v1 import lorafleet_pb2 as pb

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}
KIND_NAMES = {v: k.removeprefix("ADAPTER_KIND_").lower() for k, v in pb.AdapterKind.items()}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
CHUNK = 1 << 20
DEFAULT = object()      # "argument not given": use the client's default timeout


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before temperature,
    penalties and filters), with the most likely tokens at its position (their `top` empty)."""
    token_id: int
    token: str
    logprob: float
    bytes: bytes
    top: list["TokenLogprob"] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    """One of the n completions of a request."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)   # one per token id, when asked for


@dataclass(frozen=True)
class GenerateResult:
    """Choice 0 in the first fields (usage: the whole call); every choice in `choices`."""
    text: str
    token_ids: list[int]
    finish_reason: str          # length | stop | eos | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)   # one per token id, when asked for
    choices: list[Choice] = field(default_factory=list)


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_ids: list[int]
    finish_reason: str | None   # set on the last piece of each choice only
    index: int = 0              # which choice (n > 1): pieces of different choices interleave
    logprobs: list[TokenLogprob] = field(default_factory=list)


Message = dict | tuple   # {"role": ..., "content": ...} or (role, content)


def chat_messages(messages: list[Message]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def generate_request(prompt: str = "", adapter: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                     top_p: float = 0.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                     repetition_penalty: float = 0.0, ignore_eos: bool = False, request_id: str = "",
                     messages: list[Message] | None = None, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0, min_p: float = 0.0, min_tokens: int = 0,
                     logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
                     n: int = 1, json_schema: dict | str | None = None, regex: str | None = None,
                     grammar: str | None = None, json_object: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest for a prompt, or (with `messages`) for a chat. `seed`: None = the server
    picks one (0 is a seed); `logprobs`: None = none, k = each token's logprob and the k most
    likely tokens; `n`: completions of the prompt (seeded: seed, seed+1, ...). At most one of
    `json_schema` (a dict or its JSON text), `regex`, `grammar` (Lark) and `json_object` constrains
    the output (SamplingParams' `constraint`)."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                            ("json_object", json_object or None)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"at most one output constraint per request (got {', '.join(given)})")
    params = pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               stop=stop or [], repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
                               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, min_p=min_p,
                               min_tokens=min_tokens, logit_bias=logit_bias or {}, logprobs=logprobs is not None,
                               top_logprobs=logprobs or 0, n=n)
    if seed is not None:
        params.seed = seed
    if json_schema is not None:
        params.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif regex is not None:
        params.regex = regex
    elif grammar is not None:
        params.grammar = grammar
    elif json_object:
        params.json_object = True
    return pb.GenerateRequest(prompt=prompt, adapter=adapter, request_id=request_id,
                              messages=chat_messages(messages or []), params=params)


def token_logprobs(lps) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.token, lp.logprob, lp.bytes, token_logprobs(lp.top_logprobs)) for lp in lps]


def generate_result(r: pb.GenerateResponse) -> GenerateResult:
    choices = [Choice(c.index, c.text, list(c.token_ids), FINISH_NAMES[c.finish_reason], c.completion_tokens,
                      token_logprobs(c.logprobs)) for c in r.choices]
    logprobs = token_logprobs(r.logprobs)
    if not choices:
        choices = [Choice(0, r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason], r.usage.completion_tokens,
                          logprobs)]
    return GenerateResult(r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason],
                          r.usage.prompt_tokens, r.usage.completion_tokens, r.request_id, logprobs, choices)


def stream_piece(m: pb.GenerateStreamResponse) -> StreamPiece:
    return StreamPiece(m.text, list(m.token_ids), FINISH_NAMES[m.finish_reason] if m.finish_reason else None,
                       m.index, token_logprobs(m.logprobs))


def classifications(r: pb.ClassifyResponse) -> list[dict]:
    """[{"label": top label, "scores": {label: probability}}] per text."""
    return [{"label": c.top_label, "scores": {s.label: s.probability for s in c.scores}} for c in r.results]


class UploadTooLarge(ValueError):
    """Refused by the client before anything is sent: the archive is over the server's limit."""


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def check_upload_size(archive: DirArchive, max_adapter_bytes: int) -> None:
    """Refuse an archive above the server's per-adapter limit (GetServerInfo.limits; 0 = unknown)."""
    if max_adapter_bytes and archive.size > max_adapter_bytes:
        raise UploadTooLarge(f"{archive.directory}: the upload would be {human_bytes(archive.size)} ({archive.size} bytes); "
                             f"the server accepts at most {human_bytes(max_adapter_bytes)} ({max_adapter_bytes} bytes) "
                             f"per adapter (--max-adapter-bytes); nothing was sent")


Progress = Callable[[int, int], None]   # (bytes sent, total bytes)


def upload_messages(directory: Path, name: str, shared: bool = False,
                    kind: str | None = None) -> list[pb.UploadAdapterRequest]:
    """The whole UploadAdapter stream of a small adapter directory as a list (for callers that edit
    a message before sending; uploads themselves stream with `upload_stream`)."""
    archive = DirArchive(Path(directory))
    return list(upload_stream(archive, archive.digest(), name, shared, kind))


def upload_stream(archive: DirArchive, sha256: str, name: str, shared: bool = False, kind: str | None = None,
                  progress: Progress | None = None) -> Iterator[pb.UploadAdapterRequest]:
    """The UploadAdapter stream: metadata, then the archive read from disk in chunks of at most
    1 MiB; `progress(sent, total)` as each chunk is handed to gRPC."""
    meta = pb.UploadMetadata(name=name, sha256=sha256, total_bytes=archive.size, shared=shared)
    if kind:
        meta.kind = pb.AdapterKind.Value("ADAPTER_KIND_" + kind.upper())
    yield pb.UploadAdapterRequest(metadata=meta)
    sent = 0
    for chunk in archive.chunks(CHUNK):
        yield pb.UploadAdapterRequest(chunk=chunk)
        sent += len(chunk)
        if progress:
            progress(sent, archive.size)


def credentials(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> grpc.ChannelCredentials | None:
    """TLS (with a client certificate for mutual TLS) when `tls_ca` is given; None: plaintext."""
    if tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(), Path(tls_key).read_bytes() if tls_key else None,
                                        Path(tls_cert).read_bytes() if tls_cert else None)


def call_metadata(api_key: str | None, tenant: str | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer KEY`, and `x-tenant` for a tenant-hashing load balancer."""
    return ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + \
        ((("x-tenant", tenant),) if tenant else ())


HTTP1_SIGNS = ("Trying to connect an http1.x server", "Failed parsing HTTP/2")


def looks_like_http_port(err: grpc.RpcError) -> bool:
    """The call reached a server that answered in HTTP/1.x (e.g. the OpenAI-compatible door) instead
    of gRPC's HTTP/2: grpc-core says so in the details of its UNAVAILABLE."""
    details = err.details() or ""
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(s in details for s in HTTP1_SIGNS)


def backoff_seconds(attempt: int) -> float:
    """Jittered exponential backoff before retry number `attempt` (0-based), capped at 5 s."""
    return min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random())


def should_retry(err: grpc.RpcError, attempt: int, retries: int) -> bool:
    """Retryable codes only, and never a wrong port (an HTTP/1.x server stays one)."""
    return err.code() in RETRYABLE and attempt < retries and not looks_like_http_port(err)
