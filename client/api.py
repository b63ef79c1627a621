"""LoraFleetClient: a thin, typed wrapper over the generated stubs."""
from __future__ import annotations

import hashlib
import io
import random
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}
KIND_NAMES = {v: k.removeprefix("ADAPTER_KIND_").lower() for k, v in pb.AdapterKind.items()}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHUNK = 1 << 20
T = TypeVar("T")


def adapter_archive(directory: Path) -> bytes:
    """The upload container: a zip of adapter_config.json + adapter_model.safetensors."""
    directory = Path(directory)
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (a PEFT or lorafleet adapter dir)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in ADAPTER_FILES:
            zf.writestr(f, (directory / f).read_bytes())
    return buf.getvalue()


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


class LoraFleetClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = 120.0,
                 channel: grpc.Channel | None = None, retries: int = 0, tls_ca: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, tenant: str | None = None):
        """`retries`: extra attempts, with jittered exponential backoff, on UNAVAILABLE and
        RESOURCE_EXHAUSTED only (never for uploads). `tls_ca`: PEM root certificate for TLS;
        `tls_cert`/`tls_key`: the client certificate for mutual TLS. `tenant`: sent as the
        `x-tenant` header so a tenant-hashing load balancer keeps the tenant on few replicas
        (routing only: the server derives the tenant from the API key)."""
        if channel is None and tls_ca is not None:
            creds = grpc.ssl_channel_credentials(
                Path(tls_ca).read_bytes(), Path(tls_key).read_bytes() if tls_key else None,
                Path(tls_cert).read_bytes() if tls_cert else None)
            channel = grpc.secure_channel(target, creds)
        self.channel = channel or grpc.insecure_channel(target)
        self.retries = retries
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.timeout = timeout
        self.metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + \
            ((("x-tenant", tenant),) if tenant else ())

    def __enter__(self) -> "LoraFleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(prompt: str, adapter: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: list[str] | None = None,
                repetition_penalty: float = 0.0, ignore_eos: bool = False,
                request_id: str = "") -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt=prompt, adapter=adapter, request_id=request_id,
            params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, seed=seed, stop=stop or [],
                                     repetition_penalty=repetition_penalty, ignore_eos=ignore_eos))

    def _retry(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def generate(self, prompt: str, **kw) -> GenerateResult:
        timeout = kw.pop("timeout", self.timeout)
        req = self.request(prompt, **kw)
        r = self._retry(lambda: self.inference.Generate(req, timeout=timeout, metadata=self.metadata))
        return GenerateResult(r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason],
                              r.usage.prompt_tokens, r.usage.completion_tokens, r.request_id)

    def generate_stream(self, prompt: str, **kw) -> Iterator[StreamPiece]:
        timeout = kw.pop("timeout", self.timeout)
        for m in self.inference.GenerateStream(self.request(prompt, **kw), timeout=timeout,
                                               metadata=self.metadata):
            fin = FINISH_NAMES[m.finish_reason] if m.finish_reason else None
            yield StreamPiece(m.text, list(m.token_ids), fin)

    def server_info(self) -> pb.ServerInfo:
        return self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout,
                                            metadata=self.metadata)

    def classify(self, texts: list[str], adapter: str, timeout: float | None = None) -> list[dict]:
        """[{"label": top label, "scores": {label: probability}}] per text."""
        req = pb.ClassifyRequest(texts=texts, adapter=adapter)
        r = self._retry(lambda: self.inference.Classify(req, timeout=timeout or self.timeout,
                                                        metadata=self.metadata))
        return [{"label": c.top_label, "scores": {s.label: s.probability for s in c.scores}} for c in r.results]

    def upload_adapter(self, directory: Path, name: str, shared: bool = False,
                       kind: str | None = None, timeout: float | None = None) -> pb.AdapterInfo:
        """Upload a PEFT or lorafleet adapter directory under `name` (a new version if it exists)."""
        data = adapter_archive(Path(directory))
        meta = pb.UploadMetadata(name=name, sha256=hashlib.sha256(data).hexdigest(), total_bytes=len(data),
                                 shared=shared)
        if kind:
            meta.kind = pb.AdapterKind.Value("ADAPTER_KIND_" + kind.upper())

        def parts():
            yield pb.UploadAdapterRequest(metadata=meta)
            for i in range(0, len(data), CHUNK):
                yield pb.UploadAdapterRequest(chunk=data[i:i + CHUNK])

        return self.adapters.UploadAdapter(parts(), timeout=timeout or self.timeout, metadata=self.metadata)

    def list_adapters(self, page_size: int = 100) -> list[pb.AdapterInfo]:
        out, token = [], ""
        while True:
            r = self.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=token),
                                           timeout=self.timeout, metadata=self.metadata)
            out.extend(r.adapters)
            token = r.next_page_token
            if not token:
                return out

    def get_adapter(self, name: str) -> pb.AdapterInfo:
        return self.adapters.GetAdapter(pb.GetAdapterRequest(name=name), timeout=self.timeout,
                                        metadata=self.metadata)

    def delete_adapter(self, name: str) -> list[int]:
        r = self.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), timeout=self.timeout,
                                        metadata=self.metadata)
        return list(r.deleted_versions)
