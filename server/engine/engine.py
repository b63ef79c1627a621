"""The engine thread: owns the model, the KV cache, the adapter slots and cache, and the step loop.

    admit -> schedule -> run (forward) -> sample -> emit

Other threads talk to it only through `submit()` (a thread-safe inbox, which takes ownership of
the sequence and of its pinned adapter) and `Sequence.cancel()` (which wakes the loop). Versions
the registry frees arrive on its `freed` queue, which the loop drains. Every step's batch
description is built once and passed to the model; a step returns `StepStats`, which
`metrics.record_step` exports.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from server import metrics
from server.adapters.cache import AdapterCache
from server.adapters.refs import AdapterKey
from server.adapters.registry import AdapterRef, AdapterRegistry
from server.engine.adapter_slots import AdapterSlots
from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import KVCache
from server.engine.sampling import sample
from server.engine.scheduler import Scheduled, Scheduler
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, LoraFleetError,
                           ResourceExhausted, Unavailable)
from server.model.loader import LoadedModel

log = logging.getLogger(__name__)


class EngineCrashed(LoraFleetError):
    """The engine loop died of a bug: calls fail with INTERNAL (not in the status table)."""


@dataclass(frozen=True)
class AdapterServing:
    """What the engine needs to serve adapters: the registry (pins to release, freed versions to
    drop), the LRU index of what is cached where, and the device slots it fills."""
    registry: AdapterRegistry
    cache: AdapterCache
    slots: AdapterSlots


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics."""
    rows: int                                  # sequences in the step
    tokens: int                                # tokens through the forward pass
    prompt_tokens: int                         # of which prompt (prefill) tokens
    distinct_adapters: int
    generated: dict[str, int] = field(default_factory=dict)     # tenant -> tokens sampled
    first_token_seconds: tuple[float, ...] = ()                  # arrival -> first token, per row


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_context_tokens: int,
                 max_queued: int, max_prefill_tokens: int, adapters: AdapterServing | None = None,
                 decode_prefill_tokens: int | None = None):
        self.loaded = loaded
        self.adapters = adapters
        self.model = loaded.model
        self.kv = KVCache(self.model.args, max_batch_size, max_context_tokens, self.model.device,
                          self.model.dtype)
        self.scheduler = Scheduler(self.kv, max_batch_size, max_prefill_tokens, decode_prefill_tokens)
        self.max_queued = max_queued
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._pending: Counter[str] = Counter()   # tenant -> submitted, not yet admitted
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._last_cache_stats = None
        self.residency: dict[AdapterKey, str] = {}   # published snapshot: key -> 'device' | 'host'
        self.crashed: BaseException | None = None
        self.on_crash: list = []           # callables run (engine thread) when the loop dies of a bug
        self.steps = 0

    # ------------------------------------------------------------------ any thread
    @property
    def alive(self) -> bool:
        return self.crashed is None and self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def queued(self, tenant: str | None = None) -> int:
        """Requests submitted and not yet admitted (for one tenant, or all)."""
        with self._pending_lock:
            return self._pending[tenant] if tenant is not None else sum(self._pending.values())

    def check_capacity(self) -> None:
        """Cheap early refusal (before any tokenizing) when the queue is already full;
        submit() re-checks under the lock."""
        if self.queued() >= self.max_queued:
            raise ResourceExhausted(f"the server queue is full ({self.max_queued} requests waiting); retry later")

    def submit(self, seq: Sequence, adapter: AdapterRef | None = None) -> None:
        """Queue a sequence, taking ownership of its pinned adapter: from here on the engine
        releases the pin on every path, this one included when it refuses (queue full,
        shutting down, crashed)."""
        try:
            if self.crashed is not None:
                raise EngineCrashed(f"the engine failed ({type(self.crashed).__name__}); the server needs a restart")
            if self._stop.is_set():
                raise Unavailable("the server is shutting down; retry on another replica")
            with self._pending_lock:
                if sum(self._pending.values()) >= self.max_queued:
                    raise ResourceExhausted(
                        f"the server queue is full ({self.max_queued} requests waiting); retry later")
                self._pending[seq.tenant] += 1
        except BaseException:
            if adapter is not None and self.adapters is not None:
                self.adapters.registry.release(adapter)
            raise
        seq.adapter = adapter
        seq.bind_engine(self.wake)
        self._inbox.put(seq)

    def wake(self) -> None:
        """Make a blocked engine loop look at its state (a cancel)."""
        self._inbox.put(None)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.scheduler.has_work())
                self._drop_freed()
                self._reap()
                self._admit()
                work = self.scheduler.schedule()
                if work:
                    stats = self._step(work)
                    if stats is not None:
                        metrics.record_step(stats)
                metrics.record_load(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.usage)
        except BaseException as e:  # a bug: fail everything loudly rather than hang callers
            log.exception("engine thread crashed")
            self.crashed = e
            for fn in self.on_crash:
                fn()
        finally:
            self._fail_all()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_freed(self) -> None:
        """Versions the registry no longer serves leave the cache (or do at their last release)."""
        if self.adapters is None:
            return
        changed = False
        while True:
            try:
                key = self.adapters.registry.freed.get_nowait()
            except queue.Empty:
                break
            self.adapters.cache.invalidate(key)
            changed = True
        if changed:
            self._export_cache_stats()

    def _unpend(self, seqs: list[Sequence]) -> None:
        with self._pending_lock:
            for seq in seqs:
                self._pending[seq.tenant] -= 1
                if not self._pending[seq.tenant]:
                    del self._pending[seq.tenant]

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler.expired(now):
            if seq.kv_slot is None:
                self._unpend([seq])
            if seq.cancelled:
                self._finish(seq, seq.finish(FinishReason.CANCELLED))
            else:
                err = DeadlineExceeded(f"the request's deadline passed after {len(seq.output_ids)} "
                                       f"generated tokens ({now - seq.arrival:.3f} s after arrival)")
                self._finish(seq, seq.finish(FinishReason.CANCELLED, err))

    def _admit(self) -> None:
        admitted = self.scheduler.admit(self._make_ready)
        if self.scheduler.waiting or admitted:   # the cache was consulted
            self._export_cache_stats()
        self._unpend(admitted)
        for seq in admitted:
            metrics.QUEUE_WAIT.observe(seq.admitted_at - seq.arrival)
            if seq.error is not None:
                self._finish(seq, seq.finish(FinishReason.ERROR, seq.error))
            elif seq.kv_offset:
                self._write_prefix(seq)

    def _make_ready(self, seq: Sequence) -> bool:
        """Make the sequence's adapter resident in a device slot (False: every slot is pinned
        now, keep waiting). Problems found here fail the sequence right after admission."""
        if seq.adapter is None:
            return True
        try:
            slot = self.adapters.cache.acquire(seq.adapter.key)
        except LoraFleetError as e:
            seq.error = e
            return True
        if slot is None:
            return False
        seq.adapter_slot = slot
        info = self.adapters.slots.info[slot]
        seq.attach_virtual(info.prefix_kv.shape[3] if info.prefix_kv is not None else 0,
                           info.prompt_embeds.shape[0] if info.prompt_embeds is not None else 0)
        if seq.context_len > self.kv.max_len:
            seq.error = InvalidArgument(
                f"prompt ({len(seq.prompt_ids) - seq.virtual_tokens} tokens) + the adapter's "
                f"{seq.virtual_tokens + seq.kv_offset} virtual tokens + max_new_tokens "
                f"({seq.params.max_new_tokens}) exceeds the context of {self.kv.max_len} tokens")
        elif seq.classify and info.head is None:
            seq.error = FailedPrecondition(
                f"adapter {seq.adapter.display!r} has no classification head; Classify needs one")
        return True

    def _export_cache_stats(self) -> None:
        """Cache counters to metrics, and a fresh residency snapshot for other threads to read."""
        if self.adapters is None:
            return
        now = self.adapters.cache.stats()
        metrics.record_cache(self._last_cache_stats, now)
        self._last_cache_stats = now
        self.residency = self.adapters.cache.residency()     # replaced, never mutated

    def _write_prefix(self, seq: Sequence) -> None:
        prefix = self.adapters.slots.info[seq.adapter_slot].prefix_kv   # [L, 2, Hkv, n, hd]
        n = prefix.shape[3]
        for layer, (kc, vc) in enumerate(self.kv.layers):
            kc[seq.kv_slot, :, :n] = prefix[layer, 0]
            vc[seq.kv_slot, :, :n] = prefix[layer, 1]

    def _hooks(self, work: list[Scheduled]):
        """The step's adapter hooks, or None when no row carries an adapter."""
        if self.adapters is None or all(w.seq.adapter_slot is None for w in work):
            return None
        token_slots, prompt_rows = [], []
        for w in work:
            slot = w.seq.adapter_slot if w.seq.adapter_slot is not None else -1
            first = w.first_pos - w.seq.kv_offset          # index into prompt_ids
            for i in range(len(w.token_ids)):
                if first + i < w.seq.virtual_tokens:
                    prompt_rows.append((len(token_slots), slot, first + i))
                token_slots.append(slot)
        return self.adapters.slots.step(token_slots, prompt_rows)

    # ---- one step: run -> sample -> emit
    def _step(self, work: list[Scheduled]) -> StepStats | None:
        hidden = self._run(work)
        if hidden is None:
            return None
        self.steps += 1
        rows = [w.seq for w in work if w.want_logits]
        gen = [i for i, seq in enumerate(rows) if not seq.classify]
        for i, seq in enumerate(rows):
            if seq.classify:
                labels, probs = self._classify(seq, hidden[i])
                self._finish(seq, seq.finish(FinishReason.STOP, probabilities=probs, labels=labels))
        seqs = [rows[i] for i in gen]
        gen_hidden = hidden if len(gen) == len(rows) else hidden[gen]     # no copy without classify rows
        tokens = self._sample(seqs, gen_hidden) if seqs else []
        first_token = tuple(time.monotonic() - s.arrival for s in seqs if s.first_token_at is None)
        self._emit(seqs, tokens)
        return StepStats(
            rows=len(work), tokens=sum(len(w.token_ids) for w in work),
            prompt_tokens=sum(len(w.token_ids) for w in work if w.first_pos < len(w.seq.prompt_ids)),
            distinct_adapters=len({w.seq.adapter_slot for w in work} - {None}),
            generated=dict(Counter(s.tenant for s in seqs)), first_token_seconds=first_token)

    def _run(self, work: list[Scheduled]) -> torch.Tensor | None:
        """The forward pass: hidden states [rows wanting logits, dim], or None when it failed
        (its sequences are failed; the server goes on)."""
        segs = [Segment(w.seq.kv_slot, w.token_ids, w.first_pos, w.want_logits) for w in work]
        batch = make_forward_batch(segs, self.model.device)
        try:
            hidden = self.model.forward(batch, self.kv.layers, self._hooks(work), return_hidden=True)
        except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the server
            log.exception("forward failed; failing the %d sequences of this step", len(work))
            err = LoraFleetError(f"internal error during the forward pass: {type(e).__name__}")
            for w in work:
                self._finish(w.seq, w.seq.finish(FinishReason.ERROR, err))
            return None
        for w in work:
            w.seq.num_computed = w.first_pos + len(w.token_ids)
        return hidden

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[int]:
        """Next token per row from hidden states [rows, dim] (a row's `logits_trace`, when set,
        records its logits: tests compare them with the oracle)."""
        logits = self.model.logits(hidden)
        for seq, row in zip(seqs, logits):
            if seq.logits_trace is not None:
                seq.logits_trace.append(row.float().cpu().clone())
        return sample(logits, [s.row_state() for s in seqs])

    def _emit(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, tok in zip(seqs, tokens):
            ev = seq.append_token(tok, self.loaded.tokenizer, self.loaded.eos_ids)
            if isinstance(ev, FinishEvent):
                self._finish(seq, ev)
            elif ev is not None:
                seq.sink(ev)

    def _classify(self, seq: Sequence, h: torch.Tensor) -> tuple[tuple[str, ...], list[float]]:
        """Label names and probabilities from the adapter's head on the last token's hidden state [dim]."""
        head = self.adapters.slots.info[seq.adapter_slot].head
        logits = head.weight @ h.float().cpu()
        if head.bias is not None:
            logits = logits + head.bias
        return head.labels, logits.softmax(-1).tolist()

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.cache.release(seq.adapter.key)
            seq.adapter_slot = None
        if seq.adapter is not None:
            self.adapters.registry.release(seq.adapter)
            seq.adapter = None

    def _finish(self, seq: Sequence, ev: FinishEvent) -> None:
        self.scheduler.remove(seq)
        self._release_adapter(seq)
        now = time.monotonic()
        n = len(seq.output_ids)
        per_token = (now - seq.first_token_at) / (n - 1) if seq.first_token_at is not None and n > 1 else None
        metrics.record_finish(ev.reason.value, now - seq.arrival, per_token)
        seq.sink(ev)

    def _fail_all(self) -> None:
        err = (EngineCrashed("the engine failed while this request ran") if self.crashed is not None
               else Unavailable("the engine stopped before this request finished"))
        for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
            self._finish(seq, seq.finish(FinishReason.ERROR, err))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._release_adapter(item)
                item.sink(item.finish(FinishReason.ERROR, err))
