"""The per-step adapter plan: which rows use which slot, and how to batch them.

A plan is built once per forward step (``plan_rows`` from the engine's host-side
row -> slot list; ``make_plan`` from device tensors) and its ``AdapterPlan`` is
shared by every op of every layer, so sorting and grouping are paid once per step. Conventions (slot -1, true ranks): ``server.kernels.reference``.

It splits the rows that have an adapter into:

* **segments** (SGMV): maximal runs of >= ``min_segment`` consecutive rows with
  the same slot (prefill chunks). ``torch_ops`` runs each as one ``mm`` on views
  of x and y with the slot's exact rank: no copies, no padding.
* **buckets** (BGMV-style padded bmm) for everything else (decode tokens in any
  slot order, short runs). Rows are grouped by slot into ``G`` groups of ``L``
  rows (pad positions point at a real row and are multiplied by an exact zero)
  and run as one ``bmm`` for shrink and one for expand. Weights are taken
  either as a *view* of the contiguous slot range ``[lo, lo + G)`` of the
  stack (no copy; inactive slots in the range cost a read), or *gathered*
  per group (a copy, but only active slots; a hot slot may be split into
  several groups so one popular adapter does not pad everyone to its count).
  A small cost model picks view vs gather and ``L``. When the weights are big,
  the weight traffic a padded bmm wastes costs more than Python dispatch, so
  each ``torch_ops`` op (knowing d) may run a bucket as an SGMV loop over its
  rows sorted by slot instead (``loop`` / ``Bucket.loop_cost``).
* **tiles** (for ``triton_ops``): every row with an adapter, sorted by slot
  (``sorted_rows``), cut into tiles of at most ``TILE_ROWS`` rows of ONE slot.
  A kernel program owns one tile, so a slot's weights are read once per tile,
  not once per row: a popular adapter costs ``ceil(rows / TILE_ROWS)`` reads.

Rank heterogeneity: segments, tiles and the SGMV loop use exactly ``r_s``.
Bucketed rows are split by rank bucket, ``next_pow2(r_s)`` (1, 2, 4, ..., r_max);
a bucket runs with ``R`` = the largest true rank in it, so a rank-4 adapter
does not pay for a rank-64 neighbour. Splitting only pays when it saves weight
traffic: if slots of different ranks interleave in the stack, each bucket's
view spans nearly all of it anyway, so the plan merges the buckets when the
cost model says so. Inside a bucket, rank columns ``>= r_s`` (and pad rows) are
zeroed by a precomputed mask, so padded rank columns are never *used*.

Layouts: ``"rows"`` (``slots``, ``active_rows``, ``active_slots``: every backend, ``ia3`` and
``col_scale``), ``"batches"`` (segments and buckets: ``torch_ops``) and ``"tiles"``
(``triton_ops``). ``layouts`` says which to build (each backend's ``LAYOUT`` says which its ops
read; ``kernels.layouts``): what is not asked for is ``None``. Data movement: the planning is
host-side numpy; every index tensor of a plan (and ``slots`` itself when planned from host
values, ``plan_rows``) reaches the device in ONE host->device copy of one packed int64 buffer,
and nothing is read back (``make_plan`` on device tensors reads them to the host once first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Cost model, in units of one multiply-add of one padded row (per rank row and
# per element of d); calibrated on the bench CPU (bench/adapter_kernels.py): reading
# a weight element through a view ~ C_VIEW, gathering (copying) it ~ C_GATHER,
# one Python-dispatched mm in the SGMV loop ~ LOOP_MM_COST (~10 us there, with
# its share of the x gather and index_add).
C_VIEW = 16
C_GATHER = 96
LOOP_MM_COST = 1 << 21
BUCKET_COST = 1 << 10  # per extra rank bucket (a second op sequence), per element of d
MIN_SEGMENT = 32  # runs at least this long go to the segment (mm) path
TILE_ROWS = 16  # triton_ops: rows of one slot per program (>= 16: tl.dot's minimum M)
LAYOUTS = ("rows", "batches", "tiles")


@dataclass(frozen=True)
class Bucket:
    """Bucketed rows of one rank bucket, laid out as G groups of L rows."""

    rank: int  # R: largest true rank in the bucket (columns used)
    num_groups: int  # G
    group_len: int  # L
    first_slot: int  # view mode: groups are slots [first_slot, first_slot+G); -1: gather
    runs: tuple[tuple[int, int, int, int], ...]  # (start, end, slot, rank) within rows
    bmm_cost: int  # cost model units per element of d, padded bmm layout
    loop_cost: int  # same, SGMV loop over runs (excluding dispatch)
    group_slots: torch.Tensor  # [G] slot of each group
    gidx: torch.Tensor  # [G*L] token row of each padded position
    mask: torch.Tensor | None  # [G, L, R] float32 1/0 (pad rows, cols >= r_s); None: dense
    pos: torch.Tensor  # [N_b] padded positions that hold real rows
    rows: torch.Tensor  # [N_b] their token rows, sorted by slot


@dataclass(frozen=True)
class AdapterPlan:
    """Row -> slot layout of one forward step; see the module docstring. A layout that was not
    asked for (``make_plan(layouts=...)``) is None."""

    num_tokens: int  # T
    slots: torch.Tensor  # [T] long, -1 = no adapter (device)
    slot_ranks: torch.Tensor  # [S] long (device)
    segments: tuple[tuple[int, int, int, int], ...] | None  # (start, end, slot, rank) runs; "batches"
    buckets: tuple[Bucket, ...] | None  # "batches"
    active_rows: torch.Tensor  # [N] rows with an adapter
    active_slots: torch.Tensor  # [N] their slots
    sorted_rows: torch.Tensor | None  # [N] rows with an adapter, sorted by (slot, row); "tiles"
    tiles: torch.Tensor | None  # [n_tiles, 3] long (start, end, slot): sorted_rows[start:end], one slot; "tiles"
    loop: bool | None = None  # buckets as SGMV loop: None = cost model per op

    def need(self, layout: str) -> None:
        """Raise unless the plan holds `layout` (an op reading a layout its plan lacks is a bug)."""
        if (self.buckets if layout == "batches" else self.tiles if layout == "tiles" else self.slots) is None:
            raise ValueError(f"this plan was built without the {layout!r} layout (make_plan(layouts=...))")


class _Staging:
    """Host int64 arrays gathered for one host->device copy; `send` returns their device views."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(self, a: np.ndarray) -> int:
        self.parts.append(np.ascontiguousarray(a, dtype=np.int64))
        return len(self.parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        buf = np.concatenate([p.ravel() for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)
        flat = torch.from_numpy(buf).to(device)  # the one copy (none on CPU)
        views = flat.split([p.size for p in self.parts])
        return [v.view(p.shape) for v, p in zip(views, self.parts)]


def _layout(counts: np.ndarray, uniq: np.ndarray, mode: str | None) -> tuple[int, int, int]:
    """Pick view vs gather and the group length L; returns (first_slot or -1, L, cost / R)."""
    lmax = int(counts.max())
    span = int(uniq[-1]) - int(uniq[0]) + 1
    view = span * (C_VIEW + lmax)
    best = (math.inf, lmax)
    for L in sorted({lmax} | {1 << k for k in range(lmax.bit_length())}):
        best = min(best, (int(((counts + L - 1) // L).sum()) * (C_GATHER + L), L))
    if mode == "view" or (mode is None and view <= best[0]):
        return int(uniq[0]), lmax, view
    return -1, best[1], int(best[0])


def _merge_buckets(rs: np.ndarray, cuts: list[int], ranks: np.ndarray, mode: str | None) -> bool:
    """One bucket at the max rank is cheaper than rank buckets when slots of
    different ranks interleave in the stack: each bucket's view would span
    (and read) nearly all of it anyway. rs: [N] slots sorted by (bucket, slot)."""
    def cost(sl: np.ndarray) -> int:
        uniq, counts = np.unique(sl, return_counts=True)
        return _layout(counts, uniq, mode)[2] * int(ranks[uniq].max())

    split = sum(cost(rs[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    return cost(rs) <= split + (len(cuts) - 2) * BUCKET_COST


@dataclass(frozen=True)
class _HostBucket:
    """A bucket's host-side numbers; `arrays` are indices into the staging buffer."""

    rank: int
    num_groups: int
    group_len: int
    first_slot: int
    runs: tuple[tuple[int, int, int, int], ...]
    bmm_cost: int
    loop_cost: int
    masked: bool
    arrays: tuple[int, int, int, int, int]  # group_slots, gidx, row_rank, pos, rows

    def on_device(self, dev: list[torch.Tensor]) -> Bucket:
        group_slots, gidx, row_rank, pos, rows = (dev[i] for i in self.arrays)
        mask = None
        if self.masked:  # [G, L, R]: 1 where the column is below the row's rank (0 on pad rows)
            cols = torch.arange(self.rank, device=row_rank.device)
            mask = (cols[None, :] < row_rank[:, None]).to(torch.float32).view(
                self.num_groups, self.group_len, self.rank)
        return Bucket(self.rank, self.num_groups, self.group_len, self.first_slot, self.runs,
                      self.bmm_cost, self.loop_cost, group_slots, gidx, mask, pos, rows)


def _bucket(rows: np.ndarray, slots: np.ndarray, ranks: np.ndarray, mode: str | None,
            staging: _Staging) -> _HostBucket:
    """rows/slots: [N_b] sorted by (slot, row); ranks: [S]."""
    uniq, first, counts = np.unique(slots, return_index=True, return_counts=True)
    first_slot, L, cost = _layout(counts, uniq, mode)
    within = np.arange(rows.size) - np.repeat(first, counts)
    if first_slot >= 0:
        G = int(uniq[-1]) - first_slot + 1
        group = slots - first_slot
        group_slots = np.arange(first_slot, first_slot + G)
    else:
        chunks = (counts + L - 1) // L
        G = int(chunks.sum())
        group = np.repeat(np.cumsum(chunks) - chunks, counts) + within // L
        group_slots = np.repeat(uniq, chunks)
    pos = group * L + within % L
    gidx = np.full(G * L, rows[0], dtype=np.int64)
    gidx[pos] = rows
    row_rank = np.zeros(G * L, dtype=np.int64)
    row_rank[pos] = ranks[slots]
    R = int(row_rank.max())
    masked = bool(rows.size != G * L or (row_rank != R).any())
    ends = np.cumsum(counts).tolist()
    runs = tuple((e - c, e, sl, int(ranks[sl])) for e, c, sl in zip(ends, counts.tolist(), uniq.tolist()))
    loop_cost = int((ranks[uniq] * (C_VIEW + counts)).sum())
    arrays = tuple(staging.add(a) for a in (group_slots, gidx, row_rank, pos, rows))
    return _HostBucket(R, G, L, first_slot, runs, cost * R, loop_cost, masked, arrays)


def make_plan(
    slots: torch.Tensor,  # [T] long, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] long, true rank of each slot
    *,
    min_segment: int = MIN_SEGMENT,
    rank_buckets: bool = True,
    group_mode: str | None = None,  # None: cost model; "view" | "gather": forced
    loop: bool | None = None,  # None: cost model per op; True/False: force SGMV loop / bmm
    layouts: Sequence[str] = LAYOUTS,  # which layouts to build ("rows" always is)
) -> AdapterPlan:
    """Build the per-step plan from device tensors: one read of ``slots`` and ``slot_ranks`` to
    the host, then as ``plan_rows`` (``slots`` itself is kept as the plan's)."""
    s = slots.detach().cpu().numpy().astype(np.int64)
    ranks = slot_ranks.detach().cpu().numpy().astype(np.int64)
    return _plan(s, ranks, slot_ranks, slots.device, slots.to(torch.long).contiguous(), min_segment,
                 rank_buckets, group_mode, loop, layouts)


def plan_rows(
    rows: Sequence[int] | np.ndarray,  # [T] each row's slot, -1 = no adapter (host values)
    ranks: np.ndarray,  # [S] int64, true rank of each slot (host copy of slot_ranks)
    slot_ranks: torch.Tensor,  # [S] long, the same on the device the kernels run on
    *,
    layouts: Sequence[str] = LAYOUTS,
    min_segment: int = MIN_SEGMENT,
    rank_buckets: bool = True,
    group_mode: str | None = None,
    loop: bool | None = None,
) -> AdapterPlan:
    """Build the per-step plan from host values (the engine, once per step): the row -> slot
    list and every index derived from it go to ``slot_ranks.device`` in one copy; nothing is
    read back from the device."""
    s = np.asarray(rows, dtype=np.int64)
    return _plan(s, np.asarray(ranks, dtype=np.int64), slot_ranks, slot_ranks.device, None, min_segment,
                 rank_buckets, group_mode, loop, layouts)


def _plan(s: np.ndarray, ranks: np.ndarray, slot_ranks: torch.Tensor, device: torch.device,
          slots: torch.Tensor | None, min_segment: int, rank_buckets: bool, group_mode: str | None,
          loop: bool | None, layouts: Sequence[str]) -> AdapterPlan:
    """s: [T] slots, ranks: [S] (host). `slots`: s already on the device, or None to send it."""
    if group_mode not in (None, "view", "gather"):
        raise ValueError(f"group_mode must be None, 'view' or 'gather', not {group_mode!r}")
    if not set(layouts) <= set(LAYOUTS):
        raise ValueError(f"layouts must be of {LAYOUTS}, not {tuple(layouts)!r}")
    T, S = s.size, ranks.size
    active = s >= 0
    if (s >= S).any() or (ranks[s[active]] < 1).any():
        raise ValueError("slot out of range, or a row's slot has rank < 1")
    staging = _Staging()
    slots_at = staging.add(s) if slots is None else -1
    act_rows = np.flatnonzero(active)
    rows_at = staging.add(act_rows), staging.add(s[act_rows])
    segments = host_buckets = tiles_at = None
    if "batches" in layouts:
        segments, host_buckets = _batches(s, active, ranks, min_segment, rank_buckets, group_mode, staging)
    if "tiles" in layouts:
        tiles_at = _tiles(act_rows, s, staging)
    dev = staging.send(device)
    return AdapterPlan(
        T, dev[slots_at] if slots is None else slots, slot_ranks.to(device, torch.long).contiguous(),
        segments, None if host_buckets is None else tuple(b.on_device(dev) for b in host_buckets),
        dev[rows_at[0]], dev[rows_at[1]],
        None if tiles_at is None else dev[tiles_at[0]], None if tiles_at is None else dev[tiles_at[1]], loop)


def _batches(s: np.ndarray, active: np.ndarray, ranks: np.ndarray, min_segment: int, rank_buckets: bool,
             group_mode: str | None, staging: _Staging
             ) -> tuple[tuple[tuple[int, int, int, int], ...], list[_HostBucket]]:
    """The "batches" layout: segments (long runs of one slot) and rank buckets of the rest."""
    T, S = s.size, ranks.size
    segments: list[tuple[int, int, int, int]] = []
    bucketed = active.copy()
    if T:
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        lens = np.diff(starts, append=T)
        long_run = (s[starts] >= 0) & (lens >= min_segment)
        for a, n in zip(starts[long_run].tolist(), lens[long_run].tolist()):
            segments.append((a, a + n, int(s[a]), int(ranks[s[a]])))
        bucketed &= ~np.repeat(long_run, lens)
    rows = np.flatnonzero(bucketed)
    rs = s[rows]
    key = np.zeros_like(rs)
    if rank_buckets and rows.size:  # next power of two of the rank
        key = np.left_shift(1, np.ceil(np.log2(ranks[rs])).astype(np.int64))
    order = np.argsort(key * (S + 1) + rs, kind="stable")  # by (bucket, slot, row)
    rows, rs, key = rows[order], rs[order], key[order]
    cuts = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), rows.size]
    if len(cuts) > 2 and _merge_buckets(rs, cuts, ranks, group_mode):
        order = np.argsort(rs, kind="stable")  # one bucket, by (slot, row)
        rows, rs, cuts = rows[order], rs[order], [0, rows.size]
    buckets = [_bucket(rows[a:b], rs[a:b], ranks, group_mode, staging)
               for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return tuple(segments), buckets


def _tiles(act_rows: np.ndarray, s: np.ndarray, staging: _Staging) -> tuple[int, int]:
    """The "tiles" layout. act_rows: [N] rows with an adapter; s: [T] slots. Stages
    sorted_rows [N] and tiles [n_tiles, 3]; returns their staging indices."""
    rows = act_rows[np.argsort(s[act_rows], kind="stable")]  # by (slot, row)
    uniq, first, counts = np.unique(s[rows], return_index=True, return_counts=True)
    per_run = (counts + TILE_ROWS - 1) // TILE_ROWS
    run = np.repeat(np.arange(uniq.size), per_run)
    k = np.arange(int(per_run.sum())) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    start = first[run] + k * TILE_ROWS
    end = np.minimum(start + TILE_ROWS, first[run] + counts[run])
    return staging.add(rows), staging.add(np.stack([start, end, uniq[run]], 1).reshape(-1, 3))
