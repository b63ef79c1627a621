"""LoraFleetClient: a thin, typed wrapper over the generated stubs (blocking calls)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc

from client.common import (DEFAULT, GenerateResult, Message, Progress, StreamPiece, backoff_seconds, call_metadata,
                           check_upload_size, classifications, credentials, generate_request, generate_result,
                           should_retry, stream_piece, upload_stream)
from lorafleet.archive import DirArchive
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

T = TypeVar("T")


class LoraFleetClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = 120.0,
                 channel: grpc.Channel | None = None, retries: int = 0, tls_ca: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, tenant: str | None = None):
        """`retries`: extra attempts, with jittered exponential backoff, on UNAVAILABLE and
        RESOURCE_EXHAUSTED only (never for uploads). `tls_ca`: PEM root certificate for TLS;
        `tls_cert`/`tls_key`: the client certificate for mutual TLS. `tenant`: sent as the
        `x-tenant` header so a tenant-hashing load balancer keeps the tenant on few replicas
        (routing only: the server derives the tenant from the API key)."""
        creds = credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target))
        self.retries, self.timeout = retries, timeout
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.metadata = call_metadata(api_key, tenant)

    def __enter__(self) -> "LoraFleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    request = staticmethod(generate_request)

    def _retry(self, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if not should_retry(e, attempt, self.retries):
                    raise
                time.sleep(backoff_seconds(attempt))
                attempt += 1

    def _kw(self, timeout: float | None | object = DEFAULT) -> dict:
        """Call options: `timeout` None = no deadline; left out = the client's default."""
        return {"timeout": self.timeout if timeout is DEFAULT else timeout, "metadata": self.metadata}

    def generate(self, prompt: str, timeout: float | None | object = DEFAULT, **kw) -> GenerateResult:
        req = generate_request(prompt, **kw)
        return generate_result(self._retry(lambda: self.inference.Generate(req, **self._kw(timeout))))

    def generate_stream(self, prompt: str, timeout: float | None | object = DEFAULT, **kw) -> Iterator[StreamPiece]:
        for m in self.inference.GenerateStream(generate_request(prompt, **kw), **self._kw(timeout)):
            yield stream_piece(m)

    def chat(self, messages: list[Message], timeout: float | None | object = DEFAULT, **kw) -> GenerateResult:
        """The assistant's reply to a conversation: `messages` are {"role", "content"} dicts or
        (role, content) pairs, rendered by the model's own chat template on the server; the other
        keywords are generate()'s (adapter, max_new_tokens, temperature, ...)."""
        return self.generate("", timeout=timeout, messages=messages, **kw)

    def chat_stream(self, messages: list[Message], timeout: float | None | object = DEFAULT,
                    **kw) -> Iterator[StreamPiece]:
        return self.generate_stream("", timeout=timeout, messages=messages, **kw)

    def server_info(self) -> pb.ServerInfo:
        return self.inference.GetServerInfo(pb.GetServerInfoRequest(), **self._kw())

    def classify(self, texts: list[str], adapter: str, timeout: float | None | object = DEFAULT) -> list[dict]:
        """[{"label": top label, "scores": {label: probability}}] per text."""
        req = pb.ClassifyRequest(texts=texts, adapter=adapter)
        return classifications(self._retry(lambda: self.inference.Classify(req, **self._kw(timeout))))

    def upload_adapter(self, directory: Path, name: str, shared: bool = False, kind: str | None = None,
                       timeout: float | None | object = DEFAULT, progress: Progress | None = None) -> pb.AdapterInfo:
        """Upload a PEFT or lorafleet adapter directory under `name` (a new version if it exists).

        Asks the server's limit first (GetServerInfo) and raises UploadTooLarge, having sent
        nothing, when the archive is over it; then streams the archive from disk in 1 MiB chunks
        (never held whole), calling `progress(sent, total)` after each."""
        archive = DirArchive(directory)
        check_upload_size(archive, self.server_info().limits.max_adapter_bytes)
        sha256 = archive.digest()
        return self.adapters.UploadAdapter(upload_stream(archive, sha256, name, shared, kind, progress),
                                           **self._kw(timeout))

    def list_adapters(self, page_size: int = 100) -> list[pb.AdapterInfo]:
        out, token = [], ""
        while True:
            r = self.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=token),
                                           **self._kw())
            out.extend(r.adapters)
            token = r.next_page_token
            if not token:
                return out

    def get_adapter(self, name: str) -> pb.AdapterInfo:
        return self.adapters.GetAdapter(pb.GetAdapterRequest(name=name), **self._kw())

    def delete_adapter(self, name: str) -> list[int]:
        return list(self.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), **self._kw()).deleted_versions)
