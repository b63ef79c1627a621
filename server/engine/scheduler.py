"""Continuous batching at iteration level: which sequences run this step, and how much of each.

The scheduler decides; it never touches tensors. KV slots are plain ints from the KV allocator;
a step's work is a list of `Segment`s (engine/batch.py), one per running sequence.
Between two steps, waiting sequences are admitted into free slots and finished ones leave.
Fairness between tenants, at three places:
  admission   round-robin over tenants (FIFO within a tenant); while other tenants wait, a
              tenant may not take the slots kept for them (one per waiting tenant, up to a quarter
              of the slots), so one tenant's burst cannot hold every KV slot; and the last
              `reserve_slots` free slots are only for a tenant with nothing running, so a newcomer
              is admitted at the next step even when one tenant's long requests fill the rest;
  prefill     the step's budget is shared out by tenant (max-min fair: each tenant an equal part,
              what a tenant does not need goes to the others), FIFO within a tenant, so a short
              prompt is not queued behind a long one;
  budget      a step that carries decode rows, or a short prompt of one tenant beside another
              tenant's long prefill, takes at most `decode_prefill_tokens` prompt tokens (else
              `max_prefill_tokens`): running decodes and newly arrived short requests keep their
              pace while long prompts and classification batches are prefilled beside them.
A sequence whose adapter cannot be made resident now (every adapter slot pinned) stays queued
without blocking other tenants.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Iterator, Protocol

from server.engine.batch import Segment
from server.engine.sequence import Sequence


MIN_PREFILL_CHUNK = 16      # a tenant's prefill share never drops below this many tokens a step


class KvSlotAllocator(Protocol):
    def allocate(self) -> int | None: ...
    def release(self, kv_slot: int) -> None: ...


class FairQueue:
    """Waiting sequences: one FIFO per tenant, served round-robin."""

    def __init__(self) -> None:
        self._by_tenant: OrderedDict[str, deque[Sequence]] = OrderedDict()

    def append(self, seq: Sequence) -> None:
        self._by_tenant.setdefault(seq.tenant, deque()).append(seq)

    def remove(self, seq: Sequence) -> None:
        q = self._by_tenant[seq.tenant]
        q.remove(seq)
        if not q:
            del self._by_tenant[seq.tenant]

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_tenant.values())

    def __bool__(self) -> bool:
        return bool(self._by_tenant)

    def __iter__(self) -> Iterator[Sequence]:
        for q in list(self._by_tenant.values()):
            yield from list(q)

    def rounds(self) -> Iterator[Sequence]:
        """Candidates in fair order: each tenant's head, then each tenant's second, ..."""
        return _round_robin([list(q) for q in self._by_tenant.values()])

    def tenants(self) -> list[str]:
        return list(self._by_tenant)

    def rotate(self, tenant: str) -> None:
        """Move a tenant that was just served to the back of the round."""
        if tenant in self._by_tenant:
            self._by_tenant.move_to_end(tenant)


class Scheduler:
    def __init__(self, kv_slots: KvSlotAllocator, max_batch_size: int, max_prefill_tokens: int,
                 decode_prefill_tokens: int | None = None, reserve_slots: int = 0):
        self.kv_slots = kv_slots
        self.max_batch_size = max_batch_size
        self.reserve_slots = min(reserve_slots, max_batch_size - 1)
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_prefill_tokens = min(max_prefill_tokens, decode_prefill_tokens or max_prefill_tokens)
        self.waiting = FairQueue()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def expired(self, now: float | None = None) -> list[Sequence]:
        """Sequences cancelled by their caller or past their deadline (still listed here)."""
        now = time.monotonic() if now is None else now
        return [s for s in (*self.waiting, *self.running)
                if s.cancelled or (s.deadline is not None and now > s.deadline)]

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its slot at once."""
        if seq.kv_slot is not None:
            self.running.remove(seq)
            self.kv_slots.release(seq.kv_slot)
            seq.kv_slot = None
        else:
            self.waiting.remove(seq)

    def admit(self, make_ready: Callable[[Sequence], bool] = lambda s: True) -> list[Sequence]:
        """Move waiting sequences into free KV slots in fair order. `make_ready(seq)` makes
        the sequence's adapter resident (False: not possible now; the sequence keeps waiting)."""
        admitted, now = [], time.monotonic()
        running = Counter(s.tenant for s in self.running)
        for seq in self.waiting.rounds():
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                continue                      # reaped before the next step; never admitted
            if len(self.running) >= self.max_batch_size:
                break
            if running[seq.tenant] >= self._tenant_cap(seq.tenant):
                continue
            if running[seq.tenant] and self.max_batch_size - len(self.running) <= self.reserve_slots:
                continue                      # the last free slots wait for a tenant with none
            kv_slot = self.kv_slots.allocate()
            if kv_slot is None:
                break
            if not make_ready(seq):
                self.kv_slots.release(kv_slot)
                continue
            self.waiting.remove(seq)
            self.waiting.rotate(seq.tenant)
            seq.kv_slot, seq.admitted_at = kv_slot, now
            self.running.append(seq)
            running[seq.tenant] += 1
            admitted.append(seq)
        return admitted

    def _tenant_cap(self, tenant: str) -> int:
        """KV slots `tenant` may hold now: all, less one per other tenant waiting (at most a quarter)."""
        others = sum(1 for t in self.waiting.tenants() if t != tenant)
        return self.max_batch_size - min(others, self.max_batch_size // 4)

    def schedule(self) -> list[Segment]:
        """This step's work: one token for every decoding sequence, then prefill chunks within
        the step's prefill budget, shared fairly by tenant (admission order within one)."""
        out = []
        for seq in sorted(self.running, key=lambda s: s.kv_slot):   # consecutive slots: no KV gather
            if not seq.in_prefill:
                ids, pos = seq.next_tokens(1)
                out.append(Segment(seq.kv_slot, ids, pos, True, seq))
        by_tenant: dict[str, list[Sequence]] = {}
        for seq in self.running:
            if seq.in_prefill:
                by_tenant.setdefault(seq.tenant, []).append(seq)
        left = {t: sum(len(q.prompt_ids) - q.num_computed for q in qs) for t, qs in by_tenant.items()}
        short_beside_long = len(left) > 1 and min(left.values()) <= self.decode_prefill_tokens
        budget = self.decode_prefill_tokens if out or short_beside_long else self.max_prefill_tokens
        for tenant, share in _fair_shares(left, budget).items():
            for seq in by_tenant[tenant]:                     # admission order within a tenant
                if share <= 0:
                    break
                ids, pos = seq.next_tokens(share)
                share -= len(ids)
                out.append(Segment(seq.kv_slot, ids, pos, pos + len(ids) == seq.kv_offset + len(seq.prompt_ids), seq))
        return out


def _fair_shares(demand: dict[str, int], budget: int) -> dict[str, int]:
    """Max-min fair split of `budget` tokens over tenants' demands (each tenant at least
    MIN_PREFILL_CHUNK while the budget lasts): equal parts, what a tenant does not need shared
    again among the rest."""
    shares, open_ = dict.fromkeys(demand, 0), dict(demand)
    while open_ and budget > 0:
        part = max(MIN_PREFILL_CHUNK, budget // len(open_))
        for tenant in sorted(open_, key=open_.get):           # smallest demand first
            give = min(part, open_[tenant], budget)
            shares[tenant] += give
            budget -= give
            open_[tenant] -= give
            if not open_[tenant]:
                del open_[tenant]
            if budget <= 0:
                break
    return shares


def _round_robin(queues: list[list[Sequence]]) -> Iterator[Sequence]:
    for depth in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if depth < len(q):
                yield q[depth]
