"""What the sync and async clients share: request builders, result types, retry policy, TLS
credentials and call metadata. grpcio and protobuf only."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import grpc

from lorafleet.archive import archive_dir
from lorafleet.v1 import lorafleet_pb2 as pb

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}
KIND_NAMES = {v: k.removeprefix("ADAPTER_KIND_").lower() for k, v in pb.AdapterKind.items()}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
CHUNK = 1 << 20
DEFAULT = object()      # "argument not given": use the client's default timeout


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str          # length | stop | eos | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    request_id: str


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_ids: list[int]
    finish_reason: str | None   # set on the last piece only


Message = dict | tuple   # {"role": ..., "content": ...} or (role, content)


def chat_messages(messages: list[Message]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def generate_request(prompt: str = "", adapter: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                     top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: list[str] | None = None,
                     repetition_penalty: float = 0.0, ignore_eos: bool = False, request_id: str = "",
                     messages: list[Message] | None = None) -> pb.GenerateRequest:
    """A GenerateRequest for a prompt, or (with `messages`) for a chat."""
    return pb.GenerateRequest(
        prompt=prompt, adapter=adapter, request_id=request_id, messages=chat_messages(messages or []),
        params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop or [],
                                 repetition_penalty=repetition_penalty, ignore_eos=ignore_eos))


def generate_result(r: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason],
                          r.usage.prompt_tokens, r.usage.completion_tokens, r.request_id)


def stream_piece(m: pb.GenerateStreamResponse) -> StreamPiece:
    return StreamPiece(m.text, list(m.token_ids), FINISH_NAMES[m.finish_reason] if m.finish_reason else None)


def classifications(r: pb.ClassifyResponse) -> list[dict]:
    """[{"label": top label, "scores": {label: probability}}] per text."""
    return [{"label": c.top_label, "scores": {s.label: s.probability for s in c.scores}} for c in r.results]


def upload_messages(directory: Path, name: str, shared: bool = False,
                    kind: str | None = None) -> list[pb.UploadAdapterRequest]:
    """The UploadAdapter stream for an adapter directory: metadata, then 1 MiB chunks."""
    data = archive_dir(Path(directory))
    meta = pb.UploadMetadata(name=name, sha256=hashlib.sha256(data).hexdigest(), total_bytes=len(data),
                             shared=shared)
    if kind:
        meta.kind = pb.AdapterKind.Value("ADAPTER_KIND_" + kind.upper())
    return [pb.UploadAdapterRequest(metadata=meta)] + \
        [pb.UploadAdapterRequest(chunk=data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]


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


def backoff_seconds(attempt: int) -> float:
    """Jittered exponential backoff before retry number `attempt` (0-based), capped at 5 s."""
    return min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random())


def should_retry(err: grpc.RpcError, attempt: int, retries: int) -> bool:
    return err.code() in RETRYABLE and attempt < retries
