"""AsyncLoraFleetClient: the same calls as LoraFleetClient, for asyncio programs (grpc.aio)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from client.common import (DEFAULT, GenerateResult, Message, Progress, StreamPiece, backoff_seconds, call_metadata,
                           check_upload_size, classifications, credentials, generate_request, generate_result,
                           should_retry, stream_piece, upload_stream)
from lorafleet.archive import DirArchive
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncLoraFleetClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = 120.0,
                 retries: int = 0, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tenant: str | None = None):
        """The arguments of LoraFleetClient (see there)."""
        creds = credentials(tls_ca, tls_cert, tls_key)
        self.channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.timeout, self.retries = timeout, retries
        self.metadata = call_metadata(api_key, tenant)

    async def __aenter__(self) -> "AsyncLoraFleetClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if not should_retry(e, attempt, self.retries):
                    raise
                await asyncio.sleep(backoff_seconds(attempt))
                attempt += 1

    def _kw(self, timeout: float | None | object = DEFAULT) -> dict:
        """Call options: `timeout` None = no deadline; left out = the client's default."""
        return {"timeout": self.timeout if timeout is DEFAULT else timeout, "metadata": self.metadata}

    async def generate(self, prompt: str, timeout: float | None | object = DEFAULT, **kw) -> GenerateResult:
        req = generate_request(prompt, **kw)
        return generate_result(await self._retry(lambda: self.inference.Generate(req, **self._kw(timeout))))

    async def generate_stream(self, prompt: str, timeout: float | None | object = DEFAULT, **kw) -> AsyncIterator[StreamPiece]:
        async for m in self.inference.GenerateStream(generate_request(prompt, **kw), **self._kw(timeout)):
            yield stream_piece(m)

    async def chat(self, messages: list[Message], timeout: float | None | object = DEFAULT, **kw) -> GenerateResult:
        """The assistant's reply to a conversation (see LoraFleetClient.chat)."""
        return await self.generate("", timeout=timeout, messages=messages, **kw)

    async def chat_stream(self, messages: list[Message], timeout: float | None | object = DEFAULT,
                          **kw) -> AsyncIterator[StreamPiece]:
        async for piece in self.generate_stream("", timeout=timeout, messages=messages, **kw):
            yield piece

    async def classify(self, texts: list[str], adapter: str, timeout: float | None | object = DEFAULT) -> list[dict]:
        req = pb.ClassifyRequest(texts=texts, adapter=adapter)
        return classifications(await self._retry(lambda: self.inference.Classify(req, **self._kw(timeout))))

    async def server_info(self) -> pb.ServerInfo:
        return await self.inference.GetServerInfo(pb.GetServerInfoRequest(), **self._kw())

    async def upload_adapter(self, directory: Path, name: str, shared: bool = False, kind: str | None = None,
                             timeout: float | None | object = DEFAULT,
                             progress: Progress | None = None) -> pb.AdapterInfo:
        """LoraFleetClient.upload_adapter: the size asked first, the archive streamed from disk
        (hashed in a worker thread; its 1 MiB reads while sending run on the event loop)."""
        archive = DirArchive(directory)
        check_upload_size(archive, (await self.server_info()).limits.max_adapter_bytes)
        sha256 = await asyncio.to_thread(archive.digest)
        return await self.adapters.UploadAdapter(upload_stream(archive, sha256, name, shared, kind, progress),
                                                 **self._kw(timeout))

    async def list_adapters(self, page_size: int = 100) -> list[pb.AdapterInfo]:
        out, token = [], ""
        while True:
            r = await self.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=token),
                                                 **self._kw())
            out.extend(r.adapters)
            token = r.next_page_token
            if not token:
                return out

    async def get_adapter(self, name: str) -> pb.AdapterInfo:
        return await self.adapters.GetAdapter(pb.GetAdapterRequest(name=name), **self._kw())

    async def delete_adapter(self, name: str) -> list[int]:
        r = await self.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), **self._kw())
        return list(r.deleted_versions)
