"""gRPC servicers: translate between proto and domain types; the engine does the work."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import AsyncIterator

import grpc

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import metrics
from server.api import requests
from server.api.errors import status_of
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sequence import Event, FinishEvent, FinishReason, Sequence
from server.errors import LoraFleetError, NotFound, Unavailable

log = logging.getLogger(__name__)
VERSION = "0.1.0"

FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


async def _abort(context: grpc.aio.ServicerContext, method: str, err: BaseException) -> None:
    code = status_of(err)
    metrics.REQUESTS.labels(method, code.name).inc()
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=err)
        await context.abort(code, f"internal error ({type(err).__name__}); the server log has details")
    await context.abort(code, str(err))


def unary(method: str):
    """Map domain errors to status codes and count calls, for a unary handler."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                resp = await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as err:  # noqa: BLE001 - mapped to a status, bugs to INTERNAL
                await _abort(context, method, err)
            metrics.REQUESTS.labels(method, "OK").inc()
            return resp
        return handler
    return wrap


class Draining:
    """Shared flag: once set, new calls get UNAVAILABLE."""
    def __init__(self) -> None:
        self.on = False

    def check(self) -> None:
        if self.on:
            raise Unavailable("the server is shutting down; retry on another replica")


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, cfg: ServerConfig, engine: Engine, draining: Draining):
        self.cfg, self.engine, self.draining = cfg, engine, draining
        self.tokenizer = engine.loaded.tokenizer

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[Sequence, asyncio.Queue]:
        self.draining.check()
        params = requests.sampling_params(request.params, self.cfg)
        rid = requests.request_id(request.request_id) or uuid.uuid4().hex
        if request.adapter:
            # TODO(#4): resolve through the adapter registry once adapters land
            raise NotFound(f"adapter {request.adapter[:80]!r} not found")
        ids = requests.prompt_ids(request.prompt, self.tokenizer, self.cfg, params.max_new_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        seq = Sequence(rid, ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                       deadline=deadline)
        self.engine.submit(seq)
        return seq, events

    async def _events(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await events.get()
                yield ev
                if isinstance(ev, FinishEvent):
                    if ev.error is not None:
                        raise ev.error
                    return
        finally:
            if not seq.finished:       # caller went away (cancel, deadline): free the slot now
                seq.cancel()
                self.engine.wake()

    @unary("Generate")
    async def Generate(self, request, context):
        seq, events = self._submit(request, context)
        text, ids = [], []
        async for ev in self._events(seq, events):
            text.append(ev.text)
            ids.extend(ev.token_ids)
        return pb.GenerateResponse(text="".join(text), token_ids=ids, finish_reason=FINISH[ev.reason],
                                   usage=_usage(ev), request_id=seq.request_id)

    async def GenerateStream(self, request, context):
        method = "GenerateStream"
        try:
            seq, events = self._submit(request, context)
            async for ev in self._events(seq, events):
                msg = pb.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, request_id=seq.request_id)
                if isinstance(ev, FinishEvent):
                    msg.finish_reason = FINISH[ev.reason]
                    msg.usage.CopyFrom(_usage(ev))
                yield msg
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:  # noqa: BLE001
            await _abort(context, method, err)
        metrics.REQUESTS.labels(method, "OK").inc()

    @unary("Classify")
    async def Classify(self, request, context):
        # TODO(#5): classification heads arrive with mixed-adapter serving
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Classify needs an adapter with a classification head; not available yet")

    @unary("GetServerInfo")
    async def GetServerInfo(self, request, context):
        a, c = self.engine.model.args, self.cfg
        return pb.ServerInfo(
            version=VERSION, model_name=self.engine.loaded.name,
            model_architecture=(self.engine.loaded.hf_config.get("architectures") or ["?"])[0],
            vocab_size=a.vocab_size, hidden_size=a.dim, num_layers=a.n_layers,
            device=str(self.engine.model.device), dtype=str(self.engine.model.dtype).replace("torch.", ""),
            limits=pb.ServerLimits(
                max_prompt_tokens=c.max_prompt_tokens, max_new_tokens=c.max_new_tokens,
                max_context_tokens=c.max_context_tokens, max_stop_strings=c.max_stop_strings,
                max_stop_string_chars=c.max_stop_string_chars, max_classify_batch=c.max_classify_batch,
                max_message_bytes=c.max_message_bytes, max_queued_requests=c.max_queued_requests,
                max_batch_size=c.max_batch_size),
            adapter_kinds=[])


def _usage(ev: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)


class AdaptersService(pb_grpc.AdaptersServicer):
    """TODO(#4, #6): uploads, listing and deletion land with the adapter store."""

    async def _unimplemented(self, context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "adapter management is not available yet")

    async def UploadAdapter(self, request_iterator, context):
        await self._unimplemented(context)

    async def ListAdapters(self, request, context):
        await self._unimplemented(context)

    async def GetAdapter(self, request, context):
        await self._unimplemented(context)

    async def DeleteAdapter(self, request, context):
        await self._unimplemented(context)
