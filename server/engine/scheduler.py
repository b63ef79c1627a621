"""Continuous batching at iteration level: which sequences run this step, and how much of each.

The scheduler decides; it never touches tensors. Slots are plain ints from the KV allocator.
Between two steps, waiting sequences are admitted into free slots and finished ones leave.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from server.engine.sequence import Sequence


class SlotAllocator(Protocol):
    def allocate(self) -> int | None: ...
    def release(self, slot: int) -> None: ...


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    token_ids: list[int]
    first_pos: int
    want_logits: bool     # the step ends this sequence's prefill, or it is decoding


class Scheduler:
    def __init__(self, slots: SlotAllocator, max_batch_size: int, max_prefill_tokens: int):
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
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
        if seq.slot is not None:
            self.running.remove(seq)
            self.slots.release(seq.slot)
            seq.slot = None
        else:
            self.waiting.remove(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots, oldest first."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            slot = self.slots.allocate()
            if slot is None:
                break
            seq = self.waiting.popleft()
            seq.slot, seq.admitted_at = slot, time.monotonic()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> list[Scheduled]:
        """This step's work: one token for every decoding sequence, then prefill chunks
        within the prefill token budget, in admission order."""
        out, budget = [], self.max_prefill_tokens
        for seq in sorted(self.running, key=lambda s: s.slot):   # consecutive slots: no KV gather
            if not seq.in_prefill:
                ids, pos = seq.next_tokens(1)
                out.append(Scheduled(seq, ids, pos, True))
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                ids, pos = seq.next_tokens(budget)
                budget -= len(ids)
                out.append(Scheduled(seq, ids, pos, pos + len(ids) == len(seq.prompt_ids)))
        return out
