"""The Inference servicer: translates between proto and domain types; the engine does the work."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import kernels, metrics
from server.adapters.weights import AdapterKind
from server.adapters.refs import parse_tenant_ref
from server.adapters.registry import AdapterRegistry
from server.api import requests
from server.api.auth import Authenticator, Principal
from server.api.common import status_of, streaming, unary
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import Event, FinishEvent, Sequence
from server.errors import InvalidArgument, QuotaExceeded, Unavailable

VERSION = "0.1.0"


class Draining:
    """Shared flag: once set, new calls get UNAVAILABLE."""
    def __init__(self) -> None:
        self.on = False

    def check(self) -> None:
        if self.on:
            raise Unavailable("the server is shutting down; retry on another replica")


class TenantLimiter:
    """Per-tenant quotas on requests in flight (counted here, on the event loop) and requests
    queued (the engine's own count, read under its lock)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: dict[str, set[Sequence]] = defaultdict(set)

    def check(self, p: Principal, n: int = 1) -> None:
        live, q = len(self.live[p.tenant]), p.quotas
        if live + n > q.max_concurrent_requests:
            raise QuotaExceeded(f"tenant {p.tenant!r} has {live} requests in flight; "
                                f"quota max_concurrent_requests={q.max_concurrent_requests}",
                                f"tenant:{p.tenant}", "max_concurrent_requests")
        queued = self.engine.queued(p.tenant)
        if queued + n > q.max_queued_requests:
            raise QuotaExceeded(f"tenant {p.tenant!r} has {queued} requests queued; "
                                f"quota max_queued_requests={q.max_queued_requests}",
                                f"tenant:{p.tenant}", "max_queued_requests")

    def add(self, seq: Sequence) -> None:
        self.live[seq.tenant].add(seq)

    def done(self, seq: Sequence) -> None:
        """Idempotent: a Classify batch calls it for every text, iterated or not."""
        live = self.live.get(seq.tenant)
        if live is not None:
            live.discard(seq)
            if not live:
                del self.live[seq.tenant]


class Generation:
    """The one generation path both doors (gRPC and the OpenAI HTTP door) call: validate the
    request, resolve (pin) its adapter, submit it to the engine and stream its events. The doors
    only authenticate the caller and translate their wire format to and from `pb.GenerateRequest`."""

    def __init__(self, cfg: ServerConfig, engine: Engine, draining: Draining, registry: AdapterRegistry,
                 limiter: TenantLimiter):
        self.cfg, self.engine, self.draining = cfg, engine, draining
        self.registry, self.limiter = registry, limiter
        self.tokenizer = engine.loaded.tokenizer
        self.chat = engine.loaded.chat
        self.chat_roles = self.chat.roles() if self.chat is not None else ()

    def submit_one(self, principal: Principal, adapter: str, ids: list[int], params: SamplingParams,
                   rid: str, deadline: float | None, classify: bool = False,
                   stop_ids: frozenset[int] = frozenset()) -> tuple[Sequence, asyncio.Queue]:
        """Build the sequence, resolve (pin) its adapter and hand both to the engine, which owns
        the pin from here on, refusals included. `deadline` is a time.monotonic() value."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq = Sequence(rid, ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                       deadline=deadline, tenant=principal.tenant, classify=classify, stop_ids=stop_ids)
        ref = self.registry.resolve(parse_tenant_ref(principal.tenant, adapter)) if adapter else None
        self.engine.submit(seq, ref)
        self.limiter.add(seq)
        return seq, events

    def submit(self, principal: Principal, request: pb.GenerateRequest,
               deadline: float | None) -> tuple[Sequence, asyncio.Queue]:
        """Validate a generation request (prompt or chat messages) and submit it."""
        self.draining.check()
        self.engine.check_capacity()
        params = requests.sampling_params(request.params, self.cfg)
        rid = requests.request_id(request.request_id) or uuid.uuid4().hex
        stop_ids: frozenset[int] = frozenset()
        if request.messages:
            if request.prompt:
                raise InvalidArgument("send either prompt or messages, not both")
            ids = requests.chat_ids(request.messages, self.chat, self.chat_roles, self.tokenizer, self.cfg,
                                    params.max_new_tokens)
            stop_ids = self.chat.end_of_turn_ids
        else:
            ids = requests.prompt_ids(request.prompt, self.tokenizer, self.cfg, params.max_new_tokens)
        self.limiter.check(principal)
        return self.submit_one(principal, request.adapter, ids, params, rid, deadline, stop_ids=stop_ids)

    async def events(self, seq: Sequence, events: asyncio.Queue, protocol: str) -> AsyncIterator[Event]:
        """The sequence's events up to its finish; raises the finish's error. Leaving early
        (caller gone, deadline) cancels the sequence, which frees its slot."""
        code, finished = "CANCELLED", False
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, FinishEvent):
                    finished = True
                    code = status_of(ev.error).name if ev.error is not None else "OK"
                    metrics.TENANT_TOKENS.labels(metrics.tenant_label(seq.tenant), "prompt").inc(ev.prompt_tokens)
                    if ev.error is not None:
                        raise ev.error
                yield ev
                if isinstance(ev, FinishEvent):
                    return
        finally:
            metrics.TENANT_REQUESTS.labels(metrics.tenant_label(seq.tenant), code, protocol).inc()
            self.limiter.done(seq)
            if not finished:
                seq.cancel()


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, cfg: ServerConfig, engine: Engine, auth: Authenticator, generation: Generation):
        self.cfg, self.engine, self.auth, self.gen = cfg, engine, auth, generation
        self.draining, self.limiter = generation.draining, generation.limiter
        self.tokenizer = engine.loaded.tokenizer
        self.kernels = kernels.backend_name(engine.model.device)
        self.chat = engine.loaded.chat

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[Sequence, asyncio.Queue]:
        self.draining.check()
        principal = self.auth.principal(context.invocation_metadata())
        return self.gen.submit(principal, request, _deadline(context))

    def _events(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        return self.gen.events(seq, events, "grpc")

    @unary("Generate")
    async def Generate(self, request, context):
        seq, events = self._submit(request, context)
        text, ids = [], []
        async for ev in self._events(seq, events):
            text.append(ev.text)
            ids.extend(ev.token_ids)
        return pb.GenerateResponse(text="".join(text), token_ids=ids,
                                   finish_reason=requests.finish_to_pb(ev.reason), usage=_usage(ev),
                                   request_id=seq.request_id)

    @streaming("GenerateStream")
    async def GenerateStream(self, request, context):
        seq, events = self._submit(request, context)
        async for ev in self._events(seq, events):
            msg = pb.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, request_id=seq.request_id)
            if isinstance(ev, FinishEvent):
                msg.finish_reason = requests.finish_to_pb(ev.reason)
                msg.usage.CopyFrom(_usage(ev))
            yield msg

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
        texts_ids = [requests.prompt_ids(t, self.tokenizer, self.cfg, 0, field=f"texts[{i}]")
                     for i, t in enumerate(request.texts)]
        self.limiter.check(principal, len(texts_ids))
        params = SamplingParams(max_new_tokens=0)
        subs: list[tuple[Sequence, asyncio.Queue]] = []
        try:
            for ids in texts_ids:
                subs.append(self.gen.submit_one(principal, request.adapter, ids, params, rid, _deadline(context),
                                                  classify=True))
            results = []
            for seq, events in subs:
                async for ev in self._events(seq, events):
                    pass
                scores = [pb.LabelScore(label=lbl, probability=p) for lbl, p in zip(ev.labels, ev.probabilities)]
                top = max(scores, key=lambda s: s.probability).label
                results.append(pb.Classification(scores=scores, top_label=top, prompt_tokens=ev.prompt_tokens))
        finally:   # a failure or cancellation part-way must not leave the other texts running
            for seq, _ in subs:
                self.limiter.done(seq)
                seq.cancel()          # a no-op for the ones that finished
        return pb.ClassifyResponse(results=results, request_id=rid)

    @unary("GetServerInfo")
    async def GetServerInfo(self, request, context):
        self.auth.principal(context.invocation_metadata())
        a, c = self.engine.model.shape, self.cfg
        return pb.ServerInfo(
            version=VERSION, model_name=self.engine.loaded.name,
            model_architecture=(self.engine.loaded.hf_config.get("architectures") or ["?"])[0],
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
            device=str(self.engine.model.device), dtype=str(self.engine.model.dtype).replace("torch.", ""),
            limits=pb.ServerLimits(
                max_prompt_tokens=c.max_prompt_tokens, max_new_tokens=c.max_new_tokens,
                max_context_tokens=c.max_context_tokens, max_stop_strings=c.max_stop_strings,
                max_stop_string_chars=c.max_stop_string_chars, max_classify_batch=c.max_classify_batch,
                max_message_bytes=c.max_message_bytes, max_queued_requests=c.max_queued_requests,
                max_batch_size=c.max_batch_size, max_adapter_rank=c.max_adapter_rank,
                max_adapter_bytes=c.max_adapter_bytes),
            adapter_kinds=[k.value for k in AdapterKind], kernels=self.kernels, chat=self.chat is not None)


def _usage(ev: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                    virtual_tokens=ev.virtual_tokens)
