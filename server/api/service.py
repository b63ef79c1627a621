"""gRPC servicers: translate between proto and domain types; the engine and registry do the work."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator

import grpc

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import metrics
from server.adapters.formats import AdapterKind
from server.adapters.registry import AdapterRef, AdapterRegistry
from server.api import requests
from server.api.auth import SHARED_TENANT, Authenticator, Principal
from server.api.errors import status_of
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import Event, FinishEvent, FinishReason, Sequence
from server.errors import InvalidArgument, LoraFleetError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
VERSION = "0.1.0"

FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
KIND_TO_PB = {AdapterKind.LORA: pb.ADAPTER_KIND_LORA, AdapterKind.IA3: pb.ADAPTER_KIND_IA3,
              AdapterKind.BOTTLENECK: pb.ADAPTER_KIND_BOTTLENECK,
              AdapterKind.PREFIX_TUNING: pb.ADAPTER_KIND_PREFIX_TUNING,
              AdapterKind.PROMPT_TUNING: pb.ADAPTER_KIND_PROMPT_TUNING}
PB_TO_KIND = {v: k for k, v in KIND_TO_PB.items()}


OVERLOAD_DELAY_S = 0.05


async def _abort(context: grpc.aio.ServicerContext, method: str, err: BaseException) -> None:
    code = status_of(err)
    metrics.REQUESTS.labels(method, code.name).inc()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Server-side back-off: a client that retries at once cannot turn rejections into a busy
        # loop that starves the engine thread (GIL and CPU); the answer stays quick and explicit.
        await asyncio.sleep(OVERLOAD_DELAY_S)
    if code == grpc.StatusCode.INTERNAL and not isinstance(err, LoraFleetError):   # a bug
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


class TenantLimiter:
    """Per-tenant quotas on requests in flight and requests queued (event-loop thread only)."""

    def __init__(self) -> None:
        self.live: dict[str, set[Sequence]] = defaultdict(set)

    def check(self, p: Principal, n: int = 1) -> None:
        live = self.live[p.tenant]
        if len(live) + n > p.quotas.max_concurrent_requests:
            raise ResourceExhausted(f"tenant {p.tenant!r} has {len(live)} requests in flight; "
                                    f"quota max_concurrent_requests={p.quotas.max_concurrent_requests}")
        queued = sum(1 for s in live if s.admitted_at is None)
        if queued + n > p.quotas.max_queued_requests:
            raise ResourceExhausted(f"tenant {p.tenant!r} has {queued} requests queued; "
                                    f"quota max_queued_requests={p.quotas.max_queued_requests}")

    def add(self, seq: Sequence) -> None:
        self.live[seq.tenant].add(seq)

    def done(self, seq: Sequence) -> None:
        self.live[seq.tenant].discard(seq)


def resolve(registry: AdapterRegistry, principal: Principal, ref: str) -> AdapterRef:
    """'name[@N]' in the caller's namespace, or 'shared/name[@N]'."""
    if len(ref) > 200:
        raise InvalidArgument("adapter reference longer than 200 characters")
    if ref.startswith(SHARED_TENANT + "/"):
        return registry.resolve(SHARED_TENANT, ref[len(SHARED_TENANT) + 1:])
    return registry.resolve(principal.tenant, ref)


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, cfg: ServerConfig, engine: Engine, draining: Draining, auth: Authenticator,
                 registry: AdapterRegistry, limiter: TenantLimiter):
        self.cfg, self.engine, self.draining = cfg, engine, draining
        self.auth, self.registry, self.limiter = auth, registry, limiter
        self.tokenizer = engine.loaded.tokenizer

    def _sequence(self, principal: Principal, adapter: str, ids: list[int], params: SamplingParams,
                  rid: str, context, classify: bool = False) -> tuple[Sequence, asyncio.Queue]:
        """Resolve the adapter (pinning its version), build the sequence and submit it."""
        ref = resolve(self.registry, principal, adapter) if adapter else None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        seq = Sequence(rid, ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                       deadline=deadline, tenant=principal.tenant, adapter=ref, classify=classify)
        try:
            self.engine.submit(seq)
        except BaseException:
            if ref is not None:
                self.registry.release(ref)
            raise
        self.limiter.add(seq)
        return seq, events

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[Sequence, asyncio.Queue]:
        self.draining.check()
        principal = self.auth.principal(context.invocation_metadata())
        self.engine.check_capacity()
        params = requests.sampling_params(request.params, self.cfg)
        rid = requests.request_id(request.request_id) or uuid.uuid4().hex
        ids = requests.prompt_ids(request.prompt, self.tokenizer, self.cfg, params.max_new_tokens)
        self.limiter.check(principal)
        return self._sequence(principal, request.adapter, ids, params, rid, context)

    async def _events(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        code = "CANCELLED"
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, FinishEvent):
                    code = status_of(ev.error).name if ev.error is not None else "OK"
                    metrics.TENANT_TOKENS.labels(metrics.tenant_label(seq.tenant), "prompt").inc(ev.prompt_tokens)
                yield ev
                if isinstance(ev, FinishEvent):
                    if ev.error is not None:
                        raise ev.error
                    return
        finally:
            metrics.TENANT_REQUESTS.labels(metrics.tenant_label(seq.tenant), code).inc()
            self.limiter.done(seq)
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
        self.draining.check()
        principal = self.auth.principal(context.invocation_metadata())
        rid = requests.request_id(request.request_id) or uuid.uuid4().hex
        if not request.adapter:
            raise InvalidArgument("Classify needs an adapter that carries a classification head")
        if not request.texts or len(request.texts) > self.cfg.max_classify_batch:
            raise InvalidArgument(f"texts must hold 1..{self.cfg.max_classify_batch} strings "
                                  f"(got {len(request.texts)})")
        idss = [requests.prompt_ids(t, self.tokenizer, self.cfg, 0) for t in request.texts]
        self.limiter.check(principal, len(idss))
        params = SamplingParams(max_new_tokens=0)
        subs: list[tuple[Sequence, asyncio.Queue]] = []
        try:
            for ids in idss:
                subs.append(self._sequence(principal, request.adapter, ids, params, rid, context, classify=True))
            results = []
            for seq, events in subs:
                async for ev in self._events(seq, events):
                    pass
                scores = [pb.LabelScore(label=lbl, probability=p) for lbl, p in zip(ev.labels, ev.probabilities)]
                top = max(scores, key=lambda s: s.probability).label
                results.append(pb.Classification(scores=scores, top_label=top, prompt_tokens=ev.prompt_tokens))
        finally:   # a failure or cancellation part-way must not leave the other texts running
            for seq, _ in subs:
                if not seq.finished:
                    seq.cancel()
                self.limiter.done(seq)
            self.engine.wake()
        return pb.ClassifyResponse(results=results, request_id=rid)

    @unary("GetServerInfo")
    async def GetServerInfo(self, request, context):
        self.auth.principal(context.invocation_metadata())
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
                max_batch_size=c.max_batch_size, max_adapter_rank=c.max_adapter_rank,
                max_adapter_bytes=c.max_adapter_bytes),
            adapter_kinds=[k.value for k in AdapterKind])


def _usage(ev: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                    virtual_tokens=ev.virtual_tokens)
