"""The one generation path both doors call (the gRPC servicer and the OpenAI HTTP door): validate the
domain request once, check the caller's quotas, resolve (pin) its adapter, submit it to the engine
and stream its events. The doors only authenticate the caller and translate their wire format to
and from `GenerationRequest`."""
from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from server import metrics
from server.adapters.refs import TenantRef
from server.adapters.registry import AdapterRegistry
from server.api import requests
from server.api.auth import Principal
from server.api.common import status_of
from server.api.requests import GenerationRequest
from server.api.tenancy import TenantLimiter
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import Event, FinishEvent, Sequence
from server.errors import Unavailable


class Draining:
    """Shared flag: once set, new calls get UNAVAILABLE."""
    def __init__(self) -> None:
        self.on = False

    def check(self) -> None:
        if self.on:
            raise Unavailable("the server is shutting down; retry on another replica")


class Generation:
    def __init__(self, cfg: ServerConfig, engine: Engine, draining: Draining, registry: AdapterRegistry,
                 limiter: TenantLimiter):
        self.cfg, self.engine, self.draining = cfg, engine, draining
        self.registry, self.limiter = registry, limiter
        self.tokenizer = engine.loaded.tokenizer
        self.chat = engine.loaded.chat
        self.chat_roles = self.chat.roles() if self.chat is not None else ()

    def submit_one(self, principal: Principal, adapter: TenantRef | None, ids: list[int], params: SamplingParams,
                   rid: str, deadline: float | None, classify: bool = False,
                   stop_ids: frozenset[int] = frozenset()) -> tuple[Sequence, asyncio.Queue]:
        """Build the sequence, resolve (pin) its adapter and hand both to the engine, which owns
        the pin from here on, refusals included. `deadline` is a time.monotonic() value."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq = Sequence(rid, ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                       deadline=deadline, tenant=principal.tenant, classify=classify, stop_ids=stop_ids)
        ref = self.registry.resolve(adapter) if adapter is not None else None
        self.engine.submit(seq, ref)
        self.limiter.add(seq)
        return seq, events

    def submit(self, principal: Principal, request: GenerationRequest,
               deadline: float | None) -> tuple[Sequence, asyncio.Queue]:
        """Validate a generation request (prompt or chat messages), check quotas and submit it."""
        self.draining.check()
        self.engine.check_capacity()
        valid = requests.validate(request, self.cfg, self.tokenizer, self.chat, self.chat_roles)
        self.limiter.check(principal)
        return self.submit_one(principal, request.adapter, valid.ids, valid.params,
                               valid.request_id or uuid.uuid4().hex, deadline, stop_ids=valid.stop_ids)

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
