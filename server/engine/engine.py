"""The engine thread: owns the model, the KV cache, the adapter slots and cache, and the step loop.

    admit -> schedule -> run (forward) -> sample -> emit

Other threads talk to it only through `submit()` (a thread-safe inbox, which takes ownership of
the sequence and of its pinned adapter) and `Sequence.cancel()` (which wakes the loop). Versions
the registry frees arrive on its `freed` queue, which the loop drains. Every step's batch
description is built once and passed to the model; a step returns `StepStats`, which
`metrics.record_step` exports.

Faults are contained where they happen. A step that raises is run again in halves until the rows
that fail are alone (`_run`); a row whose sampling or detokenizing raises, or whose logits are not
finite, fails alone; each failure is the row's own status (its LoraFleetError; FAILED_PRECONDITION
naming an adapter that overflows; INTERNAL, logged, for a bug). A bug outside any row (the
scheduler, say) is caught by the supervisor (`_loop`), which fails the admitted requests with
UNAVAILABLE and starts the loop afresh.

Constrained rows (issue 23: a sequence with a `matcher`): the step's masks are filled by a
`MaskFiller` in a worker thread while the forward runs (`_start_masks` before `_run`, `_wait_masks`
after it), applied in `sample` after the penalties and logit_bias and before the temperature, and
the matcher accepts the drawn token (`_advance`); a matcher that reaches its end finishes the row
with reason STOP; a constraint that cannot go on (a refused token, a mask with no token, a limit
llguidance hits mid-way) fails that row alone with INVALID_ARGUMENT. Rows without a constraint are
sampled exactly as before.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from server import metrics
from server.adapters.cache import AdapterCache
from server.adapters.refs import AdapterKey
from server.adapters.registry import AdapterRef, AdapterRegistry
from server.engine.adapter_slots import AdapterSlots
from server.engine.batch import Segment, make_forward_batch
from server.engine.constraints import MaskFiller, allocate_bitmask, apply_masks
from server.engine.kv_cache import KVCache
from server.engine.sampling import (NON_FINITE, REFUSED, SamplingParams, TokenLogprobs, raw_logprobs, sample,
                                    token_logprobs)
from server.engine.scheduler import Scheduler
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, InvalidField, LoraFleetError,
                           ResourceExhausted, Unavailable)
from server.model.loader import LoadedModel
from server.threads import engine_team

log = logging.getLogger(__name__)
PROBE_IDS = (1, 2, 3, 5, 8, 13, 21, 34)     # the first-load probe's prompt (ids every vocabulary has)
MAX_RESTARTS = 5              # the supervisor gives up after more restarts than this ...
RESTART_WINDOW_S = 60.0       # ... within this many seconds


class EngineCrashed(LoraFleetError):
    """The engine loop failed again and again and stays down: calls fail with INTERNAL (not in the
    status table)."""


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
    token_gaps: tuple[float, ...] = ()                           # previous token -> this one, per row


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_context_tokens: int,
                 max_queued: int, max_prefill_tokens: int, adapters: AdapterServing | None = None,
                 decode_prefill_tokens: int | None = None, reserve_slots: int = 0, *,
                 kv_blocks: int | None = None, kv_block_size: int = 16, prefix_cache: bool = True,
                 reserve_blocks: int | None = None, mask_threads: int = 1, multi_tenant: bool = True):
        """`reserve_slots`: rows (and `reserve_blocks` KV blocks) kept for a tenant with nothing
        running (Scheduler); 0 when the server has one tenant. `kv_blocks`: blocks in the KV pool
        (the null block included); default: room for `max_batch_size` sequences of
        `max_context_tokens` (main.py sizes it from the byte budget instead). `mask_threads`: threads
        of one step's constraint-mask fill. `multi_tenant`: several tenants may send requests (the
        scheduler then keeps decode steps short beside prefills)."""
        self.loaded = loaded
        self.adapters = adapters
        self.model = loaded.model
        self.max_context = max_context_tokens
        if kv_blocks is None:
            kv_blocks = max_batch_size * -(-max_context_tokens // kv_block_size) + 1
        self._kv_shape = (kv_blocks, kv_block_size, prefix_cache)
        self._sizes = (max_batch_size, max_prefill_tokens, decode_prefill_tokens, reserve_slots, reserve_blocks,
                       multi_tenant)
        self.kv = self._new_kv()
        self.scheduler = self._new_scheduler()
        self.max_queued = max_queued
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._pending: Counter[str] = Counter()   # tenant -> submitted, not yet admitted
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._last_cache_stats = None
        self.residency: dict[AdapterKey, str] = {}   # published snapshot: key -> 'device' | 'host'
        self.crashed: BaseException | None = None
        self.on_health: list[Callable[[bool], None]] = []   # run (engine thread) with False when the
        #                                   loop fails (restart or gives up), True once it runs again
        self.steps = 0
        self.restarts = 0
        self._probed: set[AdapterKey] = set()    # versions whose first-load probe passed
        self._masks: MaskFiller | None = None    # made at the first constrained row (engine thread)
        self._mask_threads = mask_threads
        self.threads = torch.get_num_threads()   # the creating thread's count: the engine thread's team

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
                self._check_share(seq.tenant)
                self._pending[seq.tenant] += 1
        except BaseException:
            if adapter is not None and self.adapters is not None:
                self.adapters.registry.release(adapter)
            raise
        seq.adapter = adapter
        seq.bind_engine(self.wake)
        self._inbox.put(seq)

    def _check_share(self, tenant: str) -> None:
        """The queue's fairness rule (call with the lock held): at most `max_queued` requests wait;
        one tenant holds at most three quarters of the places, and in the last quarter a tenant may
        add requests only while it holds fewer than a sixteenth: however many requests one tenant
        sends (whatever its quota), other tenants' requests still find room."""
        total, mine = sum(self._pending.values()), self._pending.get(tenant, 0)
        if total >= self.max_queued:
            raise ResourceExhausted(f"the server queue is full ({self.max_queued} requests waiting); retry later")
        reserve = self.max_queued // 4
        if mine >= self.max_queued - reserve or (total >= self.max_queued - reserve
                                                  and mine >= max(1, self.max_queued // 16)):
            raise ResourceExhausted(
                f"tenant {tenant!r} has {mine} of the server queue's {self.max_queued} places; the rest "
                f"({total - mine} taken) is kept for other tenants' requests; retry later")

    def wake(self) -> None:
        """Make a blocked engine loop look at its state (a cancel)."""
        self._inbox.put(None)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        """The supervisor: runs the step loop; if a bug escapes it (never a request's inputs: those
        fail their rows inside the step), fails the admitted requests with UNAVAILABLE (clients
        retry), rebuilds the KV cache, scheduler and device adapter slots, and runs the loop again;
        health is NOT_SERVING meanwhile. More than MAX_RESTARTS within RESTART_WINDOW_S is a bug
        that recurs: the engine then stays down (calls get INTERNAL)."""
        restarts: deque[float] = deque()
        engine_team(self.threads)
        try:
            while not self._stop.is_set():
                try:
                    self._serve()
                except Exception as e:  # noqa: BLE001 - a bug: contain it, then start afresh
                    log.exception("engine loop failed; failing the admitted requests and restarting it")
                    now = time.monotonic()
                    restarts.append(now)
                    while restarts and now - restarts[0] > RESTART_WINDOW_S:
                        restarts.popleft()
                    self._set_health(False)
                    if len(restarts) > MAX_RESTARTS:
                        log.error("the engine failed %d times within %gs; it stays down", len(restarts),
                                  RESTART_WINDOW_S)
                        self.crashed = e
                        return
                    self._restart()
                    self.restarts += 1
                    self._set_health(True)
        except BaseException as e:  # noqa: BLE001 - the supervisor itself failed: fail loudly
            log.exception("engine thread crashed")
            self.crashed = e
            self._set_health(False)
        finally:
            self._fail_all()
            metrics.record_load((), (), 0.0)        # nothing runs or waits any more: gauges say so
            if self._masks is not None:
                self._masks.close()

    def _serve(self) -> None:
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
            metrics.record_load(self.scheduler.running, self.scheduler.waiting, self.kv.usage)
            b = self.kv.blocks
            metrics.record_kv_blocks(b.num_used, b.num_cached, b.capacity - b.num_used - b.num_cached)

    def _new_kv(self) -> KVCache:
        blocks, block_size, prefix_cache = self._kv_shape
        return KVCache(self.model.shape, blocks, block_size, self.model.device, self.model.dtype, prefix_cache)

    def _new_scheduler(self) -> Scheduler:
        batch, prefill, decode_prefill, reserve, reserve_blocks, multi_tenant = self._sizes
        return Scheduler(self.kv.blocks, batch, prefill, decode_prefill, reserve, reserve_blocks,
                         on_preempt=self._preempted, multi_tenant=multi_tenant)

    def _set_health(self, serving: bool) -> None:
        for fn in self.on_health:
            try:
                fn(serving)
            except Exception:  # noqa: BLE001 - a callback must not take the engine down
                log.exception("engine health callback failed")

    def _restart(self) -> None:
        """After a bug: admitted requests fail with UNAVAILABLE (their KV and adapter slots may be
        half-written); waiting ones keep their place; caches start empty."""
        err = Unavailable("the engine restarted after an internal error while this request ran; retry it")
        for seq in list(self.scheduler.running):
            self._finish(seq, seq.finish(FinishReason.ERROR, err))
        waiting = list(self.scheduler.waiting)
        self.kv = self._new_kv()
        self.scheduler = self._new_scheduler()
        for seq in waiting:
            self.scheduler.add(seq)
        if self.adapters is not None:
            self.adapters.cache.reset_device()
            self._export_cache_stats()

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
            self.kv.blocks.forget(str(key))          # its cached KV blocks can never be hit again
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
            if seq.admissions == 0:
                self._unpend([seq])
            if seq.cancelled:
                self._finish(seq, seq.finish(FinishReason.CANCELLED))
            else:
                err = DeadlineExceeded(f"the request's deadline passed after {len(seq.output_ids)} "
                                       f"generated tokens ({now - seq.arrival:.3f} s after arrival)")
                self._finish(seq, seq.finish(FinishReason.CANCELLED, err))

    def _admit(self) -> None:
        admitted = self.scheduler.admit(self._make_ready, self._unready)
        if self.scheduler.waiting or admitted:   # the cache was consulted
            self._export_cache_stats()
        first = [seq for seq in admitted if seq.admissions == 1]     # not re-admitted after a preemption
        self._unpend(first)
        for seq in first:
            metrics.QUEUE_WAIT.observe(seq.admitted_at - seq.arrival)
        for seq in admitted:
            if seq.error is not None:
                self._finish(seq, seq.finish(FinishReason.ERROR, seq.error))
                continue
            metrics.record_prefix_lookup(seq.tenant, seq.num_positions, seq.cached_tokens)
            if seq.kv_offset > seq.cached_tokens:
                try:
                    self._write_prefix(seq)
                except Exception as e:  # noqa: BLE001 - this row's fault
                    self._fail(seq, e, "writing the adapter's prefix")

    def _unready(self, seq: Sequence) -> None:
        """Give back the device adapter slot `_make_ready` pinned (its blocks did not fit, or it was
        preempted); the sequence keeps its registry pin and its virtual tokens."""
        if seq.adapter_slot is not None:
            self.adapters.cache.release(seq.adapter.key)
            seq.adapter_slot = None

    def _preempted(self, seq: Sequence) -> None:
        self._unready(seq)
        metrics.record_preemption(seq.tenant)

    def _make_ready(self, seq: Sequence) -> bool:
        """Make the sequence's adapter resident in a device slot (False: every slot is pinned
        now, keep waiting). Problems found here fail the sequence right after admission."""
        if seq.adapter is None:
            self._check_fits(seq)
            return True
        try:
            slot = self.adapters.cache.acquire(seq.adapter.key)
        except LoraFleetError as e:
            seq.error = e
            return True
        except Exception as e:  # noqa: BLE001 - a fault loading this adapter fails this request only
            log.error("loading adapter %s failed", seq.adapter.key, exc_info=e)
            seq.error = LoraFleetError(f"internal error while loading adapter {seq.adapter.display!r} "
                                       f"({type(e).__name__}); the server log has details")
            return True
        if slot is None:
            return False
        key = seq.adapter.key
        if key not in self._probed:
            failure = self._probe(slot)
            if failure is not None:
                seq.error = self._quarantine(seq.adapter, failure)
                return True
            self._probed.add(key)
        seq.adapter_slot = slot
        info = self.adapters.slots.info[slot]
        seq.attach_virtual(info.prefix_kv.shape[3] if info.prefix_kv is not None else 0,
                           info.prompt_embeds.shape[0] if info.prompt_embeds is not None else 0)
        if seq.context_len > self.max_context:
            seq.error = InvalidArgument(
                f"prompt ({len(seq.prompt_ids) - seq.virtual_tokens} tokens) + the adapter's "
                f"{seq.virtual_tokens + seq.kv_offset} virtual tokens + max_new_tokens "
                f"({seq.params.max_new_tokens}) exceeds the context of {self.max_context} tokens")
        elif seq.classify and info.head is None:
            seq.error = FailedPrecondition(
                f"adapter {seq.adapter.display!r} has no classification head; Classify needs one")
        else:
            self._check_fits(seq)
        return True

    def _check_fits(self, seq: Sequence) -> None:
        """A sequence whose whole context (virtual tokens included) could never fit the KV pool,
        even alone, fails now instead of waiting for blocks that cannot come."""
        blocks = self.kv.blocks
        if blocks.blocks_for(seq.context_len) > blocks.capacity:
            seq.error = ResourceExhausted(
                f"this request needs up to {seq.context_len} tokens of KV cache (virtual tokens included); the "
                f"server's KV cache holds {blocks.capacity * blocks.block_size} tokens in all: shorten it, or ask "
                "for fewer tokens")

    def _probe(self, slot: int) -> str | None:
        """Run the adapter in `slot` once on PROBE_IDS (its virtual tokens included), in a KV cache
        of its own; None when every output (hidden states, logits, head) is finite, else what was not."""
        info = self.adapters.slots.info[slot]
        n_prefix = info.prefix_kv.shape[3] if info.prefix_kv is not None else 0
        n_prompt = info.prompt_embeds.shape[0] if info.prompt_embeds is not None else 0
        seq = Sequence("probe", list(PROBE_IDS), SamplingParams(max_new_tokens=1), lambda ev: None)
        seq.attach_virtual(n_prefix, n_prompt)
        seq.adapter_slot = slot
        bs = self.kv.block_size
        kv, (table,) = KVCache.for_sequences(self.model.shape, [n_prefix + len(seq.prompt_ids)], self.model.device,
                                             self.model.dtype, bs)
        if n_prefix:
            kv.write(table, 0, info.prefix_kv)
        work = [Segment(table, seq.prompt_ids, n_prefix, True, seq)]
        batch = make_forward_batch(work, self.model.device, bs)
        hidden = self.model.forward(batch, kv.layers, self._hooks(work), return_hidden=True)
        if not bool(torch.isfinite(hidden).all()):
            return "hidden states"
        if not bool(torch.isfinite(self.model.logits(hidden)).all()):
            return "logits"
        if info.head is not None:
            scores = info.head.weight @ hidden[0].float().cpu()
            if not bool(torch.isfinite(scores).all()):
                return "classification scores"
        return None

    def _quarantine(self, ref: AdapterRef, failure: str) -> LoraFleetError:
        """The adapter's first-load probe gave non-finite outputs: stop serving that version on
        every path (this cache, the registry, the store's quarantine/) and say so."""
        reason = f"non-finite {failure} on the first-load probe"
        log.warning("adapter %s: %s; quarantining it", ref.key, reason)
        self.adapters.cache.release(ref.key)
        self.adapters.cache.invalidate(ref.key)
        try:
            self.adapters.registry.quarantine(ref.key, reason)
        except Exception:  # noqa: BLE001 - the version is no longer served here either way
            log.exception("could not quarantine adapter %s in the store", ref.key)
        self._export_cache_stats()
        return FailedPrecondition(
            f"adapter {ref.display!r} produces non-finite {failure} (its values overflow the served model); "
            "it has been quarantined and is no longer served: fix or re-train it, then upload it again")

    def _export_cache_stats(self) -> None:
        """Cache counters to metrics, and a fresh residency snapshot for other threads to read."""
        if self.adapters is None:
            return
        now = self.adapters.cache.stats()
        metrics.record_cache(self._last_cache_stats, now)
        self._last_cache_stats = now
        self.residency = self.adapters.cache.residency()     # replaced, never mutated

    def _write_prefix(self, seq: Sequence) -> None:
        """The adapter's prefix-tuning K/V into the positions not found in the prefix cache."""
        prefix = self.adapters.slots.info[seq.adapter_slot].prefix_kv   # [L, 2, Hkv, n, hd]
        start = seq.cached_tokens
        self.kv.zero_fresh()
        self.kv.write(seq.blocks, start, prefix[:, :, :, start:])

    def _hooks(self, work: list[Segment]):
        """The step's adapter hooks, or None when no row carries an adapter."""
        if self.adapters is None or all(w.seq.adapter_slot is None for w in work):
            return None
        row_slots, prompt_rows = [], []                 # each token row's adapter slot (-1: none)
        for w in work:
            slot = w.seq.adapter_slot if w.seq.adapter_slot is not None else -1
            first = w.first_pos - w.seq.kv_offset          # index into prompt_ids
            for i in range(len(w.token_ids)):
                if first + i < w.seq.virtual_tokens:
                    prompt_rows.append((len(row_slots), slot, first + i))
                row_slots.append(slot)
        return self.adapters.slots.step(row_slots, prompt_rows)

    # ---- one step: run -> sample -> emit. A fault in one row fails that row, never the step.
    def _step(self, work: list[Segment]) -> StepStats | None:
        self.kv.zero_fresh()
        constrained = self._start_masks(work)
        try:
            rows, hidden = self._run(work)
        finally:
            masks = self._wait_masks(constrained)
        if any(seq.finished for seq in rows):               # a row whose mask could not be filled
            keep = [i for i, seq in enumerate(rows) if not seq.finished]
            rows, hidden = [rows[i] for i in keep], hidden[keep]
        if not rows:
            return None
        self.steps += 1
        gen: list[Sequence] = []
        gen_index: list[int] = []
        for i, seq in enumerate(rows):
            if not seq.classify:
                gen.append(seq)
                gen_index.append(i)
                continue
            try:
                labels, probs = self._classify(seq, hidden[i])
            except Exception as e:  # noqa: BLE001 - this row's fault
                self._fail(seq, e, "classifying")
                continue
            self._finish(seq, seq.finish(FinishReason.STOP, probabilities=probs, labels=labels))
        gen_hidden = hidden if len(gen) == len(rows) else hidden[gen_index]   # no copy without classify rows
        tokens = self._sample(gen, gen_hidden, self._masks_for(gen, masks)) if gen else []
        now = time.monotonic()
        sampled = [s for s, tok in zip(gen, tokens) if tok is not None]
        first_token = tuple(now - s.arrival for s in sampled if s.first_token_at is None)
        gaps = tuple(now - s.last_token_at for s in sampled if s.last_token_at is not None)
        self._emit(gen, tokens)
        return StepStats(
            rows=len(work), tokens=sum(len(w.token_ids) for w in work),
            prompt_tokens=sum(len(w.token_ids) for w in work if w.first_pos - w.seq.kv_offset < len(w.seq.prompt_ids)),
            distinct_adapters=len({w.seq.adapter_slot for w in work} - {None}),
            generated=dict(Counter(s.tenant for s in gen)), first_token_seconds=first_token, token_gaps=gaps)

    def _run(self, work: list[Segment]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The forward pass: the sequences wanting logits and their hidden states [rows, hidden]. When
        it raises, the step is run again in halves (a re-run writes the same K/V: nothing is
        committed before a part succeeds) until the rows that fail are alone; those fail, the
        rest of the step goes on."""
        try:
            batch = make_forward_batch(work, self.model.device, self.kv.block_size)
            hidden = self.model.forward(batch, self.kv.layers, self._hooks(work), return_hidden=True)
        except Exception as e:  # noqa: BLE001 - isolate the rows that cause it
            if len(work) == 1:
                self._fail(work[0].seq, e, "running the forward pass")
                return [], None
            mid = len(work) // 2
            parts = [self._run(work[:mid]), self._run(work[mid:])]
            rows = [seq for part_rows, _ in parts for seq in part_rows]
            hiddens = [h for part_rows, h in parts if part_rows]
            return rows, (torch.cat(hiddens) if len(hiddens) > 1 else hiddens[0] if hiddens else None)
        for w in work:
            self.scheduler.computed(w.seq, w.first_pos - w.seq.kv_offset + len(w.token_ids))
        return [w.seq for w in work if w.want_logits], hidden

    def _fail(self, seq: Sequence, e: BaseException, doing: str) -> None:
        """Fail one sequence for an exception raised while `doing` its part of a step."""
        if isinstance(e, LoraFleetError):
            err = e
        elif isinstance(e, torch.OutOfMemoryError):
            err = ResourceExhausted(f"out of device memory while {doing} this request; retry it")
        else:
            log.error("request %s failed while %s", seq.request_id, doing, exc_info=e)
            err = LoraFleetError(f"internal error while {doing} this request ({type(e).__name__}); "
                                 "the server log has details")
        self._finish(seq, seq.finish(FinishReason.ERROR, err))

    def _non_finite(self, seq: Sequence) -> LoraFleetError:
        if seq.adapter is not None:
            return FailedPrecondition(
                f"adapter {seq.adapter.display!r} produced non-finite values (overflow) on this request's "
                "input: its weights are too large for the served model; fix or re-train it")
        return LoraFleetError("internal error: the base model produced non-finite logits for this request")

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor,
                bitmask: torch.Tensor | None) -> list[tuple[int, TokenLogprobs | None] | None]:
        """Next token per row (with its logprobs when the row asks) from hidden states [rows,
        hidden] (None: the row failed); `bitmask` [rows, words]: the constrained rows' masks, row
        for row (None: no row is constrained). When the batched draw raises, each row is drawn alone
        (rows drawn before the fault keep their draws: their generators have advanced) and only
        the rows that raise fail. Constrained rows' matchers then accept their tokens."""
        try:
            drawn = self._draw(seqs, hidden, bitmask)
        except Exception:  # noqa: BLE001 - isolate the row at fault
            drawn = []
            for i, seq in enumerate(seqs):
                try:
                    drawn.extend(self._draw([seq], hidden[i:i + 1], bitmask[i:i + 1] if bitmask is not None else None))
                except Exception as e:  # noqa: BLE001 - this row's fault
                    self._fail(seq, e, "sampling")
                    drawn.append(None)
        out: list[tuple[int, TokenLogprobs | None] | None] = []
        for seq, tok in zip(seqs, drawn):
            if tok is not None and tok[0] is NON_FINITE:
                self._finish(seq, seq.finish(FinishReason.ERROR, self._non_finite(seq)))
                tok = None
            elif tok is not None and (tok[0] is REFUSED or (seq.matcher is not None and not self._advance(seq, tok[0]))):
                self._finish(seq, seq.finish(FinishReason.ERROR, self._refused(seq)))
                tok = None
            out.append(tok)
        return out

    def _draw(self, seqs: list[Sequence], hidden: torch.Tensor, bitmask: torch.Tensor | None) -> list:
        """Logits -> (token, NON_FINITE or REFUSED; its logprobs or None) for rows [rows, hidden]; a
        row's `logits_trace`, when set, records its logits (tests compare them with the oracle)."""
        logits = self.model.logits(hidden)
        for seq, row in zip(seqs, logits):
            if seq.logits_trace is not None:
                seq.logits_trace.append(row.float().cpu().clone())
        rows = [s.row_state(self.loaded.eos_ids) for s in seqs]
        raw = raw_logprobs(logits, rows)            # before sample() edits the logits
        mask = None
        if bitmask is not None:
            matchers = [s.matcher for s in seqs]
            mask = lambda x: apply_masks(x, matchers, bitmask)   # noqa: E731 - applied inside sample()
        tokens = sample(logits, rows, mask)
        return list(zip(tokens, token_logprobs(raw, tokens, rows)))

    # ---- constrained rows (issue 23)
    def _start_masks(self, work: list[Segment]) -> list[Sequence]:
        """The step's constrained rows (those sampled this step), their masks started in the filler's
        worker thread so that they fill while the forward runs."""
        constrained = [w.seq for w in work if w.want_logits and w.seq.matcher is not None and not w.seq.classify]
        if constrained:
            if self._masks is None:
                info = constrained[0].constraint.info
                self._masks = MaskFiller(info, self._sizes[0], self._mask_threads)
            self._masks.start([s.matcher for s in constrained])
        return constrained

    def _wait_masks(self, constrained: list[Sequence]) -> dict[int, torch.Tensor] | None:
        """id(seq) -> its filled mask row [words] int32, or None when no row is constrained. A fill
        that raised (a bug in the library) is retried row by row so only the rows at fault fail."""
        if not constrained:
            return None
        try:
            bitmask = self._masks.wait()
            return {id(s): bitmask[i] for i, s in enumerate(constrained)}
        except Exception:  # noqa: BLE001 - isolate the row at fault
            log.exception("filling the constrained rows' masks failed; filling them one by one")
            out = {}
            for s in constrained:
                row = allocate_bitmask(1, s.constraint.info)[0]
                try:
                    s.matcher.fill_mask(row)
                    out[id(s)] = row
                except Exception as e:  # noqa: BLE001 - this row's fault
                    self._fail(s, e, "computing its constraint's token mask")
            return out

    @staticmethod
    def _masks_for(seqs: list[Sequence], masks: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
        """The bitmask [rows, words] of `seqs` row for row (unconstrained rows: all allowed, unread),
        or None when none of them is constrained."""
        if not masks or not any(id(s) in masks for s in seqs):
            return None
        any_row = next(iter(masks.values()))
        return torch.stack([masks.get(id(s), any_row) for s in seqs])

    def _advance(self, seq: Sequence, token: int) -> bool:
        """The row's matcher accepts its sampled token (False: the constraint refused it)."""
        try:
            return seq.matcher.accept(token)
        except Exception:  # noqa: BLE001 - the library failed on this row: the row fails
            log.exception("request %s: the constraint's matcher failed", seq.request_id)
            return False

    @staticmethod
    def _refused(seq: Sequence) -> InvalidField:
        why = (seq.matcher.error if seq.matcher is not None else None) or "no token satisfies it here"
        field = seq.constraint_field
        return InvalidField(field, f"{field}: the output could not follow it after {len(seq.output_ids)} tokens "
                                   f"({why}); simplify the schema, regex or grammar")

    def _emit(self, seqs: list[Sequence], tokens: list[tuple[int, TokenLogprobs | None] | None]) -> None:
        for seq, tok in zip(seqs, tokens):
            if tok is None:
                continue
            try:
                ev = seq.append_token(tok[0], self.loaded.tokenizer, self.loaded.eos_ids, tok[1])
            except Exception as e:  # noqa: BLE001 - this row's fault
                self._fail(seq, e, "detokenizing")
                continue
            if isinstance(ev, FinishEvent):
                self._finish(seq, ev)
                continue
            if ev is not None:
                self._send(seq, ev)
            if seq.matcher is not None and seq.matcher.is_done():
                self._finish(seq, seq.finish(FinishReason.STOP))    # nothing but the end may follow

    def _classify(self, seq: Sequence, h: torch.Tensor) -> tuple[tuple[str, ...], list[float]]:
        """Label names and probabilities from the adapter's head on the last token's hidden state [hidden]."""
        head = self.adapters.slots.info[seq.adapter_slot].head
        logits = head.weight @ h.float().cpu()
        if head.bias is not None:
            logits = logits + head.bias
        probs = logits.softmax(-1)
        if not bool(torch.isfinite(probs).all()):
            raise self._non_finite(seq)
        return head.labels, probs.tolist()

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.cache.release(seq.adapter.key)
            seq.adapter_slot = None
        if seq.adapter is not None:
            self.adapters.registry.release(seq.adapter)
            seq.adapter = None

    def _finish(self, seq: Sequence, ev: FinishEvent) -> None:
        self.scheduler.remove(seq, failed=ev.reason is FinishReason.ERROR)
        self._release_adapter(seq)
        metrics.record_finish(seq, ev, time.monotonic())
        self._send(seq, ev)

    @staticmethod
    def _send(seq: Sequence, ev) -> None:
        """Hand an event to the request's sink (its event loop may be gone at shutdown)."""
        try:
            seq.sink(ev)
        except Exception:  # noqa: BLE001 - a closed loop: nobody is listening any more
            log.warning("could not deliver an event of request %s (its caller's loop is closed)", seq.request_id)

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
                self._send(item, item.finish(FinishReason.ERROR, err))
