"""The one generation path both doors call (the gRPC servicer and the OpenAI HTTP door): validate the
domain request once, check the caller's quotas, resolve (pin) its adapter, submit it to the engine
and stream its events. The doors only authenticate the caller and translate their wire format to
and from `GenerationRequest`.

A request of P prompts and n choices is P * n sequences (`Submission`), in OpenAI's index order
(prompt * n + choice), each prefilled on its own: the paged KV cache's prefix sharing, when it lands,
will share their prompt blocks (same tenant, adapter and tokens) without a change here. Their events
arrive on one queue, tagged with the index; the quotas count every sequence.

A constrained request (issue 23) is compiled here, after validation and the quota check and before
anything is queued (`ConstraintCompiler.compile_async`: cached by hash, bounded by
--constraint-compile-timeout-s, off the event loop); each of its sequences gets its own matcher."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from server import metrics
from server.adapters.refs import TenantRef
from server.adapters.registry import AdapterRegistry
from server.api import requests
from server.api.auth import Principal
from server.api.common import status_of
from server.api.requests import GenerationRequest, choice_params
from server.api.tenancy import TenantLimiter
from server.config import ServerConfig
from server.engine.constraints import Compiled, ConstraintCompiler, Limits, TokenizerInfo
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


@dataclass
class Submission:
    """The sequences of one call, in index order, and the queue of their (index, event) pairs."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    n: int = 1                              # choices per prompt: seqs[i] is prompt i // n, choice i % n

    @property
    def request_id(self) -> str:
        return self.seqs[0].request_id

    def cancel(self) -> None:
        """Cancel every sequence (a no-op for the ones that finished)."""
        for seq in self.seqs:
            seq.cancel()


class Generation:
    def __init__(self, cfg: ServerConfig, engine: Engine, draining: Draining, registry: AdapterRegistry,
                 limiter: TenantLimiter):
        self.cfg, self.engine, self.draining = cfg, engine, draining
        self.registry, self.limiter = registry, limiter
        self.tokenizer = engine.loaded.tokenizer
        self.chat = engine.loaded.chat
        self.chat_roles = self.chat.roles() if self.chat is not None else ()
        # token ids a logit_bias may name: in the tokenizer and in the model's logits
        self.vocab_size = min(self.tokenizer.get_vocab_size(with_added_tokens=True), engine.model.shape.vocab_size)
        loaded = engine.loaded
        self.constraints = ConstraintCompiler(
            TokenizerInfo(loaded.tokenizer, engine.model.shape.vocab_size, loaded.eos_ids), Limits.from_config(cfg))

    def submit_one(self, principal: Principal, adapter: TenantRef | None, ids: list[int], params: SamplingParams,
                   rid: str, deadline: float | None, classify: bool = False, stop_ids: frozenset[int] = frozenset(),
                   into: Submission | None = None, constraint: Compiled | None = None,
                   constraint_field: str = "", leader: Sequence | None = None) -> Submission:
        """Build one sequence, resolve (pin) its adapter and hand both to the engine, which owns
        the pin from here on, refusals included; it joins `into` (index: its place there) or a new
        Submission. `deadline` is a time.monotonic() value."""
        sub = into if into is not None else Submission()
        loop, index, queue = asyncio.get_running_loop(), len(sub.seqs), sub.queue
        seq = Sequence(rid, ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (index, ev)),
                       deadline=deadline, tenant=principal.tenant, classify=classify, stop_ids=stop_ids,
                       constraint=constraint, constraint_field=constraint_field, leader=leader)
        ref = self.registry.resolve(adapter) if adapter is not None else None
        self.engine.submit(seq, ref)
        sub.seqs.append(seq)
        self.limiter.add(seq)
        return sub

    async def submit(self, principal: Principal, request: GenerationRequest, deadline: float | None) -> Submission:
        """Validate a generation request (prompts or chat messages; n choices each), check quotas,
        compile its constraint and submit its sequences; if one is refused, the ones submitted
        before it are cancelled."""
        self.draining.check()
        self.engine.check_capacity()
        valid = requests.validate(request, self.cfg, self.tokenizer, self.chat, self.chat_roles, self.vocab_size)
        self.limiter.check(principal, len(valid.prompts) * valid.n)
        compiled = None
        if valid.constraint is not None:
            compiled = await self.constraints.compile_async(valid.constraint, valid.constraint_field)
            self.draining.check()             # the compile may have outlasted the server's drain
        rid = valid.request_id or uuid.uuid4().hex
        sub = Submission(n=valid.n)
        try:
            for ids in valid.prompts:
                first = len(sub.seqs)
                for choice in range(valid.n):
                    self.submit_one(principal, request.adapter, ids, choice_params(valid.params, choice), rid,
                                    deadline, stop_ids=valid.stop_ids, into=sub, constraint=compiled,
                                    constraint_field=valid.constraint_field,
                                    leader=sub.seqs[first] if choice else None)   # one prefill for n
        except BaseException:
            self.close(sub)
            raise
        return sub

    def close(self, sub: Submission) -> None:
        """The call is over (idempotent): its sequences leave the quota count; unfinished ones are cancelled."""
        for seq in sub.seqs:
            self.limiter.done(seq)
        sub.cancel()

    async def events(self, sub: Submission, protocol: str) -> AsyncIterator[tuple[int, Event]]:
        """(index, event) pairs of every sequence up to its finish; raises the first finish's
        error (the other sequences are cancelled then). Leaving early (caller gone, deadline)
        cancels every sequence, which frees their slots."""
        code, left = "CANCELLED", len(sub.seqs)
        tenant = metrics.tenant_label(sub.seqs[0].tenant)
        try:
            while left:
                index, ev = await sub.queue.get()
                if isinstance(ev, FinishEvent):
                    left -= 1
                    metrics.TENANT_TOKENS.labels(tenant, "prompt").inc(ev.prompt_tokens)
                    if ev.error is not None:
                        code = status_of(ev.error).name
                        raise ev.error
                    if not left:
                        code = "OK"         # before the yield: a caller may stop at the last finish
                yield index, ev
        finally:
            metrics.TENANT_REQUESTS.labels(tenant, code, protocol).inc()
            self.close(sub)
