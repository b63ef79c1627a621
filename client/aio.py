"""AsyncLoraFleetClient: the same calls as LoraFleetClient, for asyncio programs (grpc.aio)."""
from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from client.api import (CHUNK, FINISH_NAMES, RETRYABLE, GenerateResult, LoraFleetClient, StreamPiece,
                        adapter_archive)
from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncLoraFleetClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = 120.0,
                 retries: int = 0, tls_ca: Path | None = None):
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None
        self.channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.timeout, self.retries = timeout, retries
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self) -> "AsyncLoraFleetClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def generate(self, prompt: str, **kw) -> GenerateResult:
        timeout = kw.pop("timeout", self.timeout)
        req = LoraFleetClient.request(prompt, **kw)
        r = await self._retry(lambda: self.inference.Generate(req, timeout=timeout, metadata=self.metadata))
        return GenerateResult(r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason],
                              r.usage.prompt_tokens, r.usage.completion_tokens, r.request_id)

    async def generate_stream(self, prompt: str, **kw) -> AsyncIterator[StreamPiece]:
        timeout = kw.pop("timeout", self.timeout)
        call = self.inference.GenerateStream(LoraFleetClient.request(prompt, **kw), timeout=timeout,
                                             metadata=self.metadata)
        async for m in call:
            yield StreamPiece(m.text, list(m.token_ids), FINISH_NAMES[m.finish_reason] if m.finish_reason else None)

    async def classify(self, texts: list[str], adapter: str) -> list[dict]:
        r = await self._retry(lambda: self.inference.Classify(pb.ClassifyRequest(texts=texts, adapter=adapter),
                                                              timeout=self.timeout, metadata=self.metadata))
        return [{"label": c.top_label, "scores": {s.label: s.probability for s in c.scores}} for c in r.results]

    async def server_info(self) -> pb.ServerInfo:
        return await self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout,
                                                  metadata=self.metadata)

    async def upload_adapter(self, directory: Path, name: str, shared: bool = False) -> pb.AdapterInfo:
        data = adapter_archive(Path(directory))
        meta = pb.UploadMetadata(name=name, sha256=hashlib.sha256(data).hexdigest(), total_bytes=len(data),
                                 shared=shared)

        async def parts():
            yield pb.UploadAdapterRequest(metadata=meta)
            for i in range(0, len(data), CHUNK):
                yield pb.UploadAdapterRequest(chunk=data[i:i + CHUNK])

        return await self.adapters.UploadAdapter(parts(), timeout=self.timeout, metadata=self.metadata)

    async def list_adapters(self, page_size: int = 100) -> list[pb.AdapterInfo]:
        out, token = [], ""
        while True:
            r = await self.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=token),
                                                 timeout=self.timeout, metadata=self.metadata)
            out.extend(r.adapters)
            token = r.next_page_token
            if not token:
                return out

    async def get_adapter(self, name: str) -> pb.AdapterInfo:
        return await self.adapters.GetAdapter(pb.GetAdapterRequest(name=name), timeout=self.timeout,
                                              metadata=self.metadata)

    async def delete_adapter(self, name: str) -> list[int]:
        r = await self.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), timeout=self.timeout,
                                              metadata=self.metadata)
        return list(r.deleted_versions)
