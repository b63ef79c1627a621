"""The engine thread: owns the model, the KV cache and the step loop.

    admit -> schedule -> forward -> sample -> emit

Other threads talk to it only through `submit()` (a thread-safe inbox) and
`Sequence.cancel()`. Every step's batch description is built once and passed to the model.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from server import metrics
from server.adapters.cache import AdapterCache
from server.adapters.registry import AdapterRegistry
from server.engine.adapter_slots import AdapterSlots
from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import KVCache
from server.engine.sampling import sample
from server.engine.scheduler import Scheduled, Scheduler
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import (FailedPrecondition, InvalidArgument, LoraFleetError, ResourceExhausted,
                           Unavailable)
from server.model.loader import LoadedModel

log = logging.getLogger(__name__)


class EngineCrashed(LoraFleetError):
    """The engine loop died of a bug: calls fail with INTERNAL (not in the status table)."""


@dataclass(frozen=True)
class AdapterServing:
    """What the engine needs to serve adapters: refs to release, the tiered cache, the slots."""
    registry: AdapterRegistry
    cache: AdapterCache
    slots: AdapterSlots


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_context_tokens: int,
                 max_queued: int, max_prefill_tokens: int, adapters: AdapterServing | None = None):
        self.loaded = loaded
        self.adapters = adapters
        self.model = loaded.model
        self.kv = KVCache(self.model.args, max_batch_size, max_context_tokens, self.model.device,
                          self.model.dtype)
        self.scheduler = Scheduler(self.kv, max_batch_size, max_prefill_tokens)
        self.max_queued = max_queued
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._pending = 0                  # submitted, not yet admitted (inbox + waiting)
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._last_cache_stats = None
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

    def check_capacity(self) -> None:
        """Cheap early refusal (before any tokenizing) when the queue is already full;
        submit() re-checks under the lock."""
        if self._pending >= self.max_queued:
            raise ResourceExhausted(f"the server queue is full ({self.max_queued} requests waiting); retry later")

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; ResourceExhausted at once when the queue is full."""
        if self.crashed is not None:
            raise EngineCrashed(f"the engine failed ({type(self.crashed).__name__}); the server needs a restart")
        if self._stop.is_set():
            raise Unavailable("the server is shutting down; retry on another replica")
        with self._pending_lock:
            if self._pending >= self.max_queued:
                raise ResourceExhausted(
                    f"the server queue is full ({self.max_queued} requests waiting); retry later")
            self._pending += 1
        self._inbox.put(seq)

    def wake(self) -> None:
        """Make a blocked engine loop look at its state (after a cancel)."""
        self._inbox.put(None)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.scheduler.has_work())
                self._reap()
                self._admit()
                work = self.scheduler.schedule()
                if work:
                    self._step(work)
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
        metrics.WAITING.set(len(self.scheduler.waiting))

    def _unpend(self, n: int) -> None:
        with self._pending_lock:
            self._pending -= n

    def _reap(self) -> None:
        for seq in self.scheduler.expired():
            if seq.slot is None:
                self._unpend(1)
            self._finish(seq, seq.finish(FinishReason.CANCELLED))

    def _admit(self) -> None:
        admitted = self.scheduler.admit(self._make_ready)
        if self.scheduler.waiting or admitted:   # the cache was consulted
            self._export_cache_stats()
        if admitted:
            self._unpend(len(admitted))
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
                f"adapter {seq.adapter.name!r} has no classification head; Classify needs one")
        return True

    def _export_cache_stats(self) -> None:
        """Turn the cache's cumulative counters into Prometheus increments (engine thread)."""
        if self.adapters is None:
            return
        now = self.adapters.cache.stats()
        last, self._last_cache_stats = self._last_cache_stats, now
        for tier in ("device", "host"):
            a, b = getattr(last, tier) if last else None, getattr(now, tier)
            dh, dm = b.hits - (a.hits if a else 0), b.misses - (a.misses if a else 0)
            de, ds = b.evictions - (a.evictions if a else 0), b.load_seconds - (a.load_seconds if a else 0.0)
            metrics.ADAPTER_CACHE_HITS.labels(tier).inc(dh)
            metrics.ADAPTER_CACHE_MISSES.labels(tier).inc(dm)
            metrics.ADAPTER_EVICTIONS.labels(tier).inc(de)
            for _ in range(dm):
                metrics.ADAPTER_LOAD_SECONDS.labels(tier).observe(ds / dm)
        metrics.ADAPTERS_RESIDENT.labels("device").set(now.resident_slots)
        metrics.ADAPTERS_RESIDENT.labels("host").set(now.host_entries)

    def _write_prefix(self, seq: Sequence) -> None:
        prefix = self.adapters.slots.info[seq.adapter_slot].prefix_kv   # [L, 2, Hkv, n, hd]
        n = prefix.shape[3]
        for layer, (kc, vc) in enumerate(self.kv.layers):
            kc[seq.slot, :, :n] = prefix[layer, 0]
            vc[seq.slot, :, :n] = prefix[layer, 1]

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

    def _step(self, work: list[Scheduled]) -> None:
        segs = [Segment(w.seq.slot, w.token_ids, w.first_pos, w.want_logits) for w in work]
        batch = make_forward_batch(segs, self.model.device)
        try:
            hidden = self.model.forward(batch, self.kv.layers, self._hooks(work), return_hidden=True)
        except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the server
            log.exception("forward failed; failing the %d sequences of this step", len(work))
            err = LoraFleetError(f"internal error during the forward pass: {type(e).__name__}")
            for w in work:
                self._finish(w.seq, w.seq.finish(FinishReason.ERROR, err))
            return
        self.steps += 1
        for w in work:
            w.seq.num_computed = w.first_pos + len(w.token_ids)
        rows = [w.seq for w in work if w.want_logits]
        gen = [i for i, s in enumerate(rows) if not s.classify]
        for i, seq in enumerate(rows):
            if seq.classify:
                labels, probs = self._classify(seq, hidden[i])
                self._finish(seq, seq.finish(FinishReason.STOP, probabilities=probs, labels=labels))
        rows = [rows[i] for i in gen]
        logits = self.model.logits(hidden[gen])
        for seq, row in zip(rows, logits):
            if seq.logits_trace is not None:
                seq.logits_trace.append(row.float().cpu().clone())
        tokens = sample(logits, [s.row_state() for s in rows]) if rows else []
        metrics.BATCH_SIZE.observe(len(work))
        metrics.BATCH_TOKENS.observe(int(batch.input_ids.numel()))
        metrics.BATCH_ADAPTERS.observe(len({w.seq.adapter_slot for w in work} - {None}))
        per_tenant: dict[str, int] = {}
        for seq in rows:
            per_tenant[seq.tenant] = per_tenant.get(seq.tenant, 0) + 1
        for tenant, n in per_tenant.items():
            metrics.TENANT_TOKENS.labels(metrics.tenant_label(tenant), "generated").inc(n)
        metrics.GENERATED_TOKENS.inc(len(rows))
        metrics.PROMPT_TOKENS.inc(sum(len(w.token_ids) for w in work if w.first_pos < len(w.seq.prompt_ids)))
        for seq, tok in zip(rows, tokens):
            if seq.first_token_at is None:
                metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - seq.arrival)
            ev = seq.append_token(tok, self.loaded.tokenizer, self.loaded.eos_ids)
            if ev is None:
                continue
            if isinstance(ev, FinishEvent):
                self._finish(seq, ev)
            else:
                seq.sink(ev)
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.KV_CACHE_USAGE.set(self.kv.usage)

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
        metrics.FINISHED.labels(ev.reason.value).inc()
        metrics.E2E_LATENCY.observe(now - seq.arrival)
        if seq.first_token_at is not None and len(seq.output_ids) > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - seq.first_token_at) / (len(seq.output_ids) - 1))
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
