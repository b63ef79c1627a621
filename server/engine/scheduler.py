"""Continuous batching at iteration level: which sequences run this step, and how much of each.

The scheduler decides; it never touches tensors. KV memory is paged: it asks the block manager
(engine/kv_cache.py) for blocks; a step's work is a list of `Segment`s (engine/batch.py), one per
running sequence, each carrying its block table.

Admission by blocks: a waiting sequence is admitted when the blocks of everything it has to run
(its prompt; after a preemption, prompt and output so far) fit, prefix-cache hits first (they cost
no new block). A decoding sequence gets one more block whenever it crosses a block boundary; when
none is left, the youngest sequence of the tenant holding the most blocks is preempted (its blocks
freed, its full computed blocks kept in the prefix cache) and goes back to the front of its
tenant's queue, to be recomputed when it is admitted again: never a crash, a lost request or a
truncation. A sequence whose context could never fit the pool is refused by the engine at admission.

Fairness between tenants, at three places:
  admission   round-robin over tenants (FIFO within a tenant); while other tenants wait, a
              tenant may not take the rows kept for them (one per waiting tenant, up to a quarter
              of the rows), so one tenant's burst cannot hold every row; and the last
              `reserve_slots` rows, and the last `reserve_blocks` KV blocks ("room for a
              newcomer"), are only admitted into by a tenant with nothing running, so a newcomer is
              admitted at the next step even when one tenant's long requests fill the rest (running
              sequences may still grow into those blocks: decoding is never held). When a sequence
              does not fit, its tenant's later ones wait behind it, and so do other tenants that
              have something running (a large request is not overtaken forever); a tenant with
              nothing running may still be admitted past it;
  prefill     the step's budget is shared out by tenant (max-min fair: each tenant an equal part,
              what a tenant does not need goes to the others), FIFO within a tenant, so a short
              prompt is not queued behind a long one;
  budget      on a server with several tenants (`multi_tenant`), a step that carries decode rows,
              or a short prompt of one tenant beside another tenant's long prefill, takes at most
              `decode_prefill_tokens` prompt tokens (else `max_prefill_tokens`): running decodes
              and newly arrived short requests keep their pace while long prompts and
              classification batches are prefilled beside them. With one tenant there is nobody
              to protect: its decodes do not shorten the step, so a burst is prefilled in a few long
              steps instead of dozens of short ones that each read every weight (issue 24).
A sequence whose adapter cannot be made resident now (every adapter slot pinned) stays queued
without blocking other tenants.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Iterator

from server.engine.batch import Segment
from server.engine.kv_cache import BlockManager, Namespace
from server.engine.sequence import Sequence


MIN_PREFILL_CHUNK = 16      # a tenant's prefill share never drops below this many tokens a step


def namespace(seq: Sequence) -> Namespace:
    """The prefix-cache namespace of a sequence: its tenant and its adapter version."""
    return seq.tenant, str(seq.adapter.key) if seq.adapter is not None else None


class FairQueue:
    """Waiting sequences: one FIFO per tenant, served round-robin."""

    def __init__(self) -> None:
        self._by_tenant: OrderedDict[str, deque[Sequence]] = OrderedDict()

    def append(self, seq: Sequence) -> None:
        self._by_tenant.setdefault(seq.tenant, deque()).append(seq)

    def appendleft(self, seq: Sequence) -> None:
        """Back to the head of its tenant's queue (a preempted sequence)."""
        self._by_tenant.setdefault(seq.tenant, deque()).appendleft(seq)

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
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int,
                 decode_prefill_tokens: int | None = None, reserve_slots: int = 0,
                 reserve_blocks: int | None = None, on_preempt: Callable[[Sequence], None] = lambda s: None,
                 multi_tenant: bool = True):
        """`reserve_blocks`: KV blocks kept for a tenant with nothing running; default: room for
        one `max_prefill_tokens` prompt per reserved slot (at most a quarter of the pool).
        `multi_tenant`: several tenants may send requests (decode rows then cap the prefill budget).
        `on_preempt(seq)` is told of every sequence `schedule` preempts (back in the waiting queue,
        its blocks freed)."""
        self.blocks = blocks
        self.on_preempt = on_preempt
        self.max_batch_size = max_batch_size
        self.reserve_slots = min(reserve_slots, max_batch_size - 1)
        if reserve_blocks is None:
            reserve_blocks = self.reserve_slots * blocks.blocks_for(max_prefill_tokens)
        self.reserve_blocks = min(reserve_blocks, blocks.capacity // 4)
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_prefill_tokens = min(max_prefill_tokens, decode_prefill_tokens or max_prefill_tokens)
        self.multi_tenant = multi_tenant
        self.waiting = FairQueue()
        self.running: list[Sequence] = []        # admission order
        self.preemptions: Counter[str] = Counter()   # tenant -> sequences preempted (cumulative)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def expired(self, now: float | None = None) -> list[Sequence]:
        """Sequences cancelled by their caller or past their deadline (still listed here)."""
        now = time.monotonic() if now is None else now
        return [s for s in (*self.waiting, *self.running)
                if s.cancelled or (s.deadline is not None and now > s.deadline)]

    def remove(self, seq: Sequence, failed: bool = False) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its blocks at once (a
        failed sequence's blocks leave the prefix cache too)."""
        if seq.blocks is not None:
            self.running.remove(seq)
            self.blocks.release(seq.blocks, keep_cached=not failed)
            self.blocks.unreserve(seq.extent)
            seq.blocks, seq.extent = None, None
        else:
            self.waiting.remove(seq)

    # ---------------------------------------------------------------- admission
    def admit(self, make_ready: Callable[[Sequence], bool] = lambda s: True,
              unready: Callable[[Sequence], None] = lambda s: None) -> list[Sequence]:
        """Move waiting sequences into running, with their blocks, in fair order. `make_ready(seq)`
        makes the sequence's adapter resident (False: not possible now; the sequence keeps waiting);
        `unready(seq)` undoes it when the blocks then do not fit."""
        admitted, now = [], time.monotonic()
        running = Counter(s.tenant for s in self.running)
        stalled: set[str] = set()             # tenants whose next sequence did not fit
        for seq in self.waiting.rounds():
            t = seq.tenant
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                continue                      # reaped before the next step; never admitted
            if len(self.running) >= self.max_batch_size:
                break
            if t in stalled or (stalled and running[t]):
                continue                      # FIFO within a tenant; busy tenants wait behind it
            if running[t] >= self._tenant_cap(t):
                continue
            if (self.blocks.prefix_cache and seq.leader is not None and seq.leader.prompt_pending
                    and seq.num_positions > self.blocks.block_size):
                continue                      # n > 1: a later choice waits for the first one's prompt
                                              # blocks, then takes them from the prefix cache
            if running[t] and self.max_batch_size - len(self.running) <= self.reserve_slots:
                continue                      # the last free rows wait for a tenant with none
            keep = self.reserve_blocks if running[t] else 0
            if not self.blocks.can_allocate(1, keep=keep):   # any prompt needs one new block
                stalled.add(t)
                continue
            if not make_ready(seq):
                continue
            if seq.error is None and not self._allocate(seq, keep):
                unready(seq)
                stalled.add(t)
                continue
            if seq.error is not None:
                seq.blocks = []               # failed by the engine right after admission
            self.waiting.remove(seq)
            self.waiting.rotate(t)
            seq.admissions += 1
            if seq.admitted_at is None:
                seq.admitted_at = now
            self.running.append(seq)
            running[t] += 1
            admitted.append(seq)
        return admitted

    def _allocate(self, seq: Sequence, keep: int) -> bool:
        """Blocks for every position the sequence has to run, prefix-cache hits first (never its
        last token: its logits are needed); False (nothing taken) when they do not fit."""
        bs, total = self.blocks.block_size, seq.num_positions
        hits, digests = [], []
        if self.blocks.prefix_cache:
            most = (total - 1) // bs
            hits, digests = self.blocks.match(namespace(seq), seq.hash_tokens(0, most * bs), most)
        new = self.blocks.blocks_for(total) - len(hits)
        if not self.blocks.can_allocate(new, hits, keep):
            return False
        self.blocks.take(hits)
        # one run for the whole context where the pool has one: the sequence grows in place
        got, seq.extent = self.blocks.allocate_run(new, self.blocks.blocks_for(seq.context_len) - len(hits))
        seq.blocks = hits + got
        seq.block_digests = digests
        seq.cached_tokens = len(hits) * bs
        seq.num_computed = max(0, seq.cached_tokens - seq.kv_offset)
        return True

    def _tenant_cap(self, tenant: str) -> int:
        """Rows `tenant` may hold now: all, less one per other tenant waiting (at most a quarter)."""
        others = sum(1 for t in self.waiting.tenants() if t != tenant)
        return self.max_batch_size - min(others, self.max_batch_size // 4)

    # ---------------------------------------------------------------- after a forward
    def computed(self, seq: Sequence, num_computed: int) -> None:
        """The step ran: K/V of the sequence's tokens up to `num_computed` are in its blocks.
        Full blocks enter the prefix index (prompt and generated tokens alike)."""
        seq.num_computed = num_computed
        if not self.blocks.prefix_cache or seq.blocks is None:
            return
        bs = self.blocks.block_size
        space = namespace(seq)
        for i in range(len(seq.block_digests), (seq.kv_offset + num_computed) // bs):
            parent = seq.block_digests[-1] if seq.block_digests else None
            seq.block_digests.append(self.blocks.register(space, seq.blocks[i], parent,
                                                          seq.hash_tokens(i * bs, (i + 1) * bs)))

    # ---------------------------------------------------------------- one step
    def schedule(self) -> list[Segment]:
        """This step's work: one token for every decoding sequence (a new block when it crosses a
        block boundary, preempting when none is left), then prefill chunks within the step's
        prefill budget, shared fairly by tenant (admission order within one)."""
        self._grow()
        out = []
        for seq in sorted(self.running, key=lambda s: s.blocks[0] if s.blocks else 0):   # runs in pool order:
            if not seq.in_prefill:                                                        # read in place
                ids, pos = seq.next_tokens(1)
                out.append(Segment(seq.blocks, ids, pos, True, seq))
        by_tenant: dict[str, list[Sequence]] = {}
        for seq in self.running:
            if seq.in_prefill:
                by_tenant.setdefault(seq.tenant, []).append(seq)
        left = {t: sum(q.num_positions - q.kv_offset - q.num_computed for q in qs) for t, qs in by_tenant.items()}
        short_beside_long = len(left) > 1 and min(left.values()) <= self.decode_prefill_tokens
        capped = (bool(out) and self.multi_tenant) or short_beside_long
        budget = self.decode_prefill_tokens if capped else self.max_prefill_tokens
        for tenant, share in _fair_shares(left, budget).items():
            for seq in by_tenant[tenant]:                     # admission order within a tenant
                if share <= 0:
                    break
                ids, pos = seq.next_tokens(share)
                share -= len(ids)
                out.append(Segment(seq.blocks, ids, pos, pos + len(ids) == seq.num_positions, seq))
        return out

    def _grow(self) -> None:
        """A block for every decoding sequence whose next token starts one (oldest first); when
        none is left, preempt (see `_victim`) until it fits or the sequence itself was preempted."""
        for seq in list(self.running):
            if seq.blocks is None or seq.in_prefill:
                continue                              # preempted meanwhile, or prefilling (has its blocks)
            need = self.blocks.blocks_for(seq.kv_offset + seq.num_computed + 1) - len(seq.blocks)
            while need > 0 and seq.blocks is not None:
                got = self.blocks.allocate_next(seq.blocks[-1]) if need == 1 else self.blocks.allocate(need)
                if got is not None:
                    seq.blocks.extend(got)
                    break
                victim = self._victim()
                self.preempt(victim)
                self.on_preempt(victim)

    def _victim(self) -> Sequence:
        """The youngest sequence of the tenant holding the most blocks."""
        held: Counter[str] = Counter()
        for s in self.running:
            held[s.tenant] += len(s.blocks)
        tenant = max(held, key=held.get)
        return [s for s in self.running if s.tenant == tenant][-1]

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks (full computed ones stay in the prefix cache) and put it
        back at the head of its tenant's queue; it is recomputed when admitted again."""
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        self.blocks.unreserve(seq.extent)
        seq.reset_kv()
        self.waiting.appendleft(seq)
        self.preemptions[seq.tenant] += 1


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
