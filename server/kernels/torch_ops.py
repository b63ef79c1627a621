"""Batched adapter ops in plain torch (CPU and GPU): many adapters, one pass.

Semantics are those of ``server.kernels.reference`` (read its docstring for the
conventions: slot -1, true ranks, in-place outputs). This module adds the plan.

The plan (``make_plan``) is built once per forward step and shared by every op
of every layer, so all sorting/grouping is paid once per step. It splits the
rows that have an adapter into two parts:

* **segments** (SGMV): maximal runs of >= ``min_segment`` consecutive rows with
  the same slot (prefill chunks). Each is one ``mm`` on views of x and y with
  the slot's exact rank: no copies, no padding.
* **buckets** (BGMV-style padded bmm) for everything else (decode tokens in any
  slot order, short runs). Rows are grouped by slot into ``G`` groups of ``L``
  rows (pad positions point at a real row and are multiplied by an exact zero)
  and run as one ``bmm`` for shrink and one for expand. Weights are taken
  either as a *view* of the contiguous slot range ``[lo, lo + G)`` of the
  stack (no copy; inactive slots in the range cost a read), or *gathered*
  per group (a copy, but only active slots; a hot slot may be split into
  several groups so one popular adapter does not pad everyone to its count).
  A small cost model in ``make_plan`` picks view vs gather and ``L``. When the
  weights are big, the weight traffic a padded bmm wastes (inactive slots in a
  view, copies, padded ranks) costs more than Python dispatch, so each op
  (knowing d) may run a bucket as SGMV over its rows sorted by slot instead:
  one gather of x, one ``mm`` pair per slot on weight views with the exact
  rank, one index_add.

Rank heterogeneity: segments and the SGMV loop use exactly ``r_s``. Bucketed
rows are split by rank bucket, ``next_pow2(r_s)`` (1, 2, 4, ..., r_max); a
bucket runs with ``R`` = the largest true rank in it, so a rank-4 adapter
does not pay for a rank-64 neighbour. Splitting only pays when it saves weight
traffic: if slots of different ranks interleave in the stack, each bucket's
view spans nearly all of it anyway, so the plan merges the buckets when the
cost model says so (the adapter cache can keep rank classes in contiguous
slot ranges to get the benefit). Inside a bucket, rank columns ``>= r_s`` (and
pad rows) are zeroed by a precomputed mask after the shrink, so padded rank
columns of the weights are never *used*, whatever finite values they hold.

Dtypes: x, weights and y share one dtype; v (the rank-space activation) is
kept in that dtype; scales are applied to v. Only the engine thread calls
these, and no op keeps state between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Cost model, in units of one multiply-add of one padded row (per rank row and
# per element of d); calibrated on the bench CPU (bench/kernels.py): reading
# a weight element through a view ~ C_VIEW, gathering (copying) it ~ C_GATHER,
# one Python-dispatched mm in the SGMV loop ~ LOOP_MM_COST (~10 us there, with
# its share of the x gather and index_add).
C_VIEW = 16
C_GATHER = 96
LOOP_MM_COST = 1 << 21
BUCKET_COST = 1 << 10  # per extra rank bucket (a second op sequence), per element of d
MIN_SEGMENT = 32  # runs at least this long go to the segment (mm) path


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
    """Row -> slot layout of one forward step; see the module docstring."""

    num_tokens: int  # T
    slots: torch.Tensor  # [T] long, -1 = no adapter (device)
    slot_ranks: torch.Tensor  # [S] long (device)
    segments: tuple[tuple[int, int, int, int], ...]  # (start, end, slot, rank) runs
    buckets: tuple[Bucket, ...]
    active_rows: torch.Tensor  # [N] rows with an adapter
    active_slots: torch.Tensor  # [N] their slots
    loop: bool | None = None  # buckets as SGMV loop: None = cost model per op


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


def _bucket(rows: np.ndarray, slots: np.ndarray, ranks: np.ndarray, mode: str | None,
            device: torch.device) -> Bucket:
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
    mask = None
    if rows.size != G * L or (row_rank != R).any():
        mask = (np.arange(R)[None, :] < row_rank[:, None]).astype(np.float32).reshape(G, L, R)
    ends = np.cumsum(counts).tolist()
    runs = tuple((e - c, e, sl, int(ranks[sl])) for e, c, sl in zip(ends, counts.tolist(), uniq.tolist()))
    loop_cost = int((ranks[uniq] * (C_VIEW + counts)).sum())
    dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Bucket(R, G, L, first_slot, runs, cost * R, loop_cost,
                  dev(group_slots), dev(gidx), None if mask is None else dev(mask),
                  dev(pos), dev(rows))


def make_plan(
    slots: torch.Tensor,  # [T] long, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] long, true rank of each slot
    *,
    min_segment: int = MIN_SEGMENT,
    rank_buckets: bool = True,
    group_mode: str | None = None,  # None: cost model; "view" | "gather": forced
    loop: bool | None = None,  # None: cost model per op; True/False: force SGMV loop / bmm
) -> AdapterPlan:
    """Build the per-step plan (host-side numpy work on a copy of ``slots``)."""
    if group_mode not in (None, "view", "gather"):
        raise ValueError(f"group_mode must be None, 'view' or 'gather', not {group_mode!r}")
    device = slots.device
    s = slots.detach().cpu().numpy().astype(np.int64)
    ranks = slot_ranks.detach().cpu().numpy().astype(np.int64)
    T, S = s.size, ranks.size
    active = s >= 0
    if (s >= S).any() or (ranks[s[active]] < 1).any():
        raise ValueError("slot out of range, or a row's slot has rank < 1")
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
    buckets = tuple(_bucket(rows[a:b], rs[a:b], ranks, group_mode, device)
                    for a, b in zip(cuts[:-1], cuts[1:]) if b > a)
    act_rows = np.flatnonzero(active)
    return AdapterPlan(T, slots.to(torch.long).contiguous(),
                       slot_ranks.to(device, torch.long).contiguous(), tuple(segments), buckets,
                       torch.from_numpy(act_rows).to(device),
                       torch.from_numpy(s[act_rows]).to(device), loop)


# ---------------------------------------------------------------- execution helpers


def _loop(plan: AdapterPlan, bk: Bucket, dims: int, mats: int) -> bool:
    """Run this bucket as an SGMV loop when the weight traffic it saves over the
    padded bmm (cost model x d) pays for dispatching one mm per slot and matrix.
    dims: sum of the d of the weight matrices read; mats: their number."""
    if plan.loop is not None:
        return plan.loop
    return (bk.bmm_cost - bk.loop_cost) * dims > len(bk.runs) * mats * LOOP_MM_COST


def _runs(plan: AdapterPlan, x: torch.Tensor, y: torch.Tensor, dims: int, mats: int,
          body) -> None:
    """SGMV: body(x_rows, y_rows, slot, rank) for each prefill segment (views of
    x and y) and for each slot of each loop bucket (rows gathered from x, a
    zero buffer for y added back with index_add)."""
    for a, b, s, r in plan.segments:
        body(x[a:b], y[a:b], s, r)
    for bk in plan.buckets:
        if _loop(plan, bk, dims, mats):
            xs = x.index_select(0, bk.rows)
            out = y.new_zeros(xs.shape[0], y.shape[1])
            for a, b, s, r in bk.runs:
                body(xs[a:b], out[a:b], s, r)
            y.index_add_(0, bk.rows, out)


def _bmm_buckets(plan: AdapterPlan, dims: int, mats: int) -> list[Bucket]:
    return [bk for bk in plan.buckets if not _loop(plan, bk, dims, mats)]


def _bucket_shrink(xs: torch.Tensor, A: torch.Tensor, bk: Bucket, off: int, R: int) -> torch.Tensor:
    """xs [G, L, d_in] (gathered rows), A [S, rows, d_in] -> [G, L, R] using
    weight rows off..off+R of each group's slot. Unmasked."""
    if bk.first_slot >= 0:
        W = A[bk.first_slot : bk.first_slot + bk.num_groups, off : off + R]
    else:
        W = A[:, off : off + R].flatten(1).index_select(0, bk.group_slots).view(-1, R, A.shape[-1])
    return torch.bmm(xs, W.transpose(1, 2))


def _bucket_expand(y: torch.Tensor, vb: torch.Tensor, B: torch.Tensor, bk: Bucket,
                   bias: torch.Tensor | None = None) -> None:
    """y[gidx] += vb @ B_g[:, :, :R]^T (+ bias); vb [G, L, R] already scaled and
    masked; bias [G, L|1, d_out] must be zero on pad rows. B may be a transposed
    view of a contiguous [S, r_max, d_out] stack (the engine's layout): then the
    bmm reads contiguous rows, ~3x faster on CPU than the [S, d_out, r_max] layout."""
    R, d_out = vb.shape[-1], B.shape[1]
    Bt = B.transpose(1, 2)  # [S, r_max, d_out]
    if bk.first_slot >= 0:
        Wt = Bt[bk.first_slot : bk.first_slot + bk.num_groups, :R]
    elif Bt.is_contiguous():
        Wt = Bt[:, :R].index_select(0, bk.group_slots)
    elif R == B.shape[-1] and B.is_contiguous():
        Wt = B.flatten(1).index_select(0, bk.group_slots).view(-1, *B.shape[1:]).transpose(1, 2)
    else:
        Wt = B[:, :, :R].index_select(0, bk.group_slots).transpose(1, 2)
    out = torch.bmm(vb, Wt)
    if bias is not None:
        out += bias
    y.index_add_(0, bk.gidx, out.view(-1, d_out))


def _per_group(t: torch.Tensor, bk: Bucket) -> torch.Tensor:
    """[S, ...] per-slot tensor -> [G, ...] per-group (a view in view mode)."""
    if bk.first_slot >= 0:
        return t[bk.first_slot : bk.first_slot + bk.num_groups]
    return t.index_select(0, bk.group_slots)


def _coef(scale: torch.Tensor, bk: Bucket) -> torch.Tensor:
    """[G, L|1, R|1] factor applied to v: scale of the group's slot x mask."""
    sc = _per_group(scale, bk).view(-1, 1, 1)
    return sc if bk.mask is None else bk.mask * sc


def _gather_rows(x: torch.Tensor, bk: Bucket) -> torch.Tensor:
    return x.index_select(0, bk.gidx).view(bk.num_groups, bk.group_len, x.shape[-1])


def _activate(z: torch.Tensor, act_ids: torch.Tensor) -> torch.Tensor:
    """Per-row activation; act_ids broadcasts against z (0 relu, 1 gelu, 2 silu)."""
    return torch.where(act_ids == 0, F.relu(z), torch.where(act_ids == 1, F.gelu(z), F.silu(z)))


def _check(plan: AdapterPlan, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.shape[0] != plan.num_tokens:
            raise ValueError(f"batch has {t.shape[0]} rows, plan has {plan.num_tokens}")


def _host(scale: torch.Tensor) -> list[float] | None:
    """Scales as host floats on CPU (addmm's alpha saves one op per run); None on
    GPU, where reading them would synchronise."""
    return scale.tolist() if scale.device.type == "cpu" else None


def _addmm_scaled(yr: torch.Tensor, vr: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor,
                  host: list[float] | None, s: int) -> None:
    """yr += scale[s] * vr @ w_t  (vr is a fresh tensor and may be scaled in place)."""
    if host is None:
        yr.addmm_(vr.mul_(scale[s]), w_t)
    else:
        yr.addmm_(vr, w_t, alpha=host[s])


# ---------------------------------------------------------------- ops


def shrink(
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    plan: AdapterPlan,
) -> torch.Tensor:  # [num_tokens, r_max], dtype of x
    """for t: s = slots[t]; v[t] = 0; if s >= 0: v[t, :r_s] = A[s, :r_s] @ x[t]

    Rows with slot -1 and rank columns >= r_s are exactly zero."""
    _check(plan, x)
    v = x.new_zeros(x.shape[0], A.shape[1])
    d_in = x.shape[1]

    def body(xr, vr, s, r):
        vr[:, :r] = xr @ A[s, :r].t()

    _runs(plan, x, v, d_in, 1, body)
    for bk in _bmm_buckets(plan, d_in, 1):
        vb = _bucket_shrink(_gather_rows(x, bk), A, bk, 0, bk.rank)
        if bk.mask is not None:
            vb.mul_(bk.mask)
        v[:, : bk.rank].index_copy_(0, bk.rows, vb.view(-1, bk.rank).index_select(0, bk.pos))
    return v


def expand(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    v: torch.Tensor,  # [num_tokens, r_max]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] += scale[s] * B[s, :, :r_s] @ v[t, :r_s]"""
    _check(plan, y, v)
    d_out = y.shape[1]

    host = _host(scale)

    def body(vr, yr, s, r):
        if host is None:
            yr.addmm_(vr[:, :r] * scale[s], B[s, :, :r].t())
        else:
            yr.addmm_(vr[:, :r], B[s, :, :r].t(), alpha=host[s])

    _runs(plan, v, y, d_out, 1, body)
    for bk in _bmm_buckets(plan, d_out, 1):
        _bucket_expand(y, _gather_rows(v[:, : bk.rank], bk).mul_(_coef(scale, bk)), B, bk)


def lora(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0:
    y[t] += scale[s] * B[s, :, :r_s] @ (A[s, :r_s] @ x[t])"""
    _check(plan, y, x)
    dims = x.shape[1] + y.shape[1]

    host = _host(scale)

    def body(xr, yr, s, r):
        _addmm_scaled(yr, xr @ A[s, :r].t(), B[s, :, :r].t(), scale, host, s)

    _runs(plan, x, y, dims, 2, body)
    for bk in _bmm_buckets(plan, dims, 2):
        vb = _bucket_shrink(_gather_rows(x, bk), A, bk, 0, bk.rank)
        _bucket_expand(y, vb.mul_(_coef(scale, bk)), B, bk)


def lora_packed(
    y: torch.Tensor,  # [num_tokens, sum(d_out_i)] (in place)
    x: torch.Tensor,  # [num_tokens, d_in]
    A_packed: torch.Tensor,  # [num_slots, n_targets * r_max, d_in]
    B_list: Sequence[torch.Tensor],  # n_targets x [num_slots, d_out_i, r_max]
    scales: Sequence[torch.Tensor],  # n_targets x [num_slots]
    out_slices: Sequence[slice],  # n_targets column slices of y, width d_out_i
    plan: AdapterPlan,
) -> None:
    """r_max = A_packed.shape[1] // n_targets; target i owns rank rows
    [i*r_max, (i+1)*r_max) of A_packed. for t: s = slots[t]; if s >= 0: for i:
    y[t, out_slices[i]] += scales[i][s] * B_i[s, :, :r_s] @ (A_packed[s, i*r_max:][:r_s] @ x[t])

    One gather of x and (when a bucket has R == r_max) one shrink for all
    targets; columns of y outside out_slices are untouched."""
    _check(plan, y, x)
    n = len(B_list)
    r_max = A_packed.shape[1] // n
    targets = list(zip(B_list, scales, out_slices, strict=True))
    dims = n * x.shape[1] + sum(B.shape[1] for B in B_list)

    hosts = [_host(scale) for scale in scales]

    def body(xr, yr, s, r):
        for i, (B, scale, cols) in enumerate(targets):
            vr = xr @ A_packed[s, i * r_max : i * r_max + r].t()
            _addmm_scaled(yr[:, cols], vr, B[s, :, :r].t(), scale, hosts[i], s)

    _runs(plan, x, y, dims, 2 * n, body)
    for bk in _bmm_buckets(plan, dims, 2 * n):
        xs = _gather_rows(x, bk)
        R = bk.rank
        if R == r_max:  # one shrink for all targets
            v_all = _bucket_shrink(xs, A_packed, bk, 0, n * R)
        for i, (B, scale, cols) in enumerate(targets):
            vb = v_all[..., i * R : (i + 1) * R] if R == r_max else \
                _bucket_shrink(xs, A_packed, bk, i * r_max, R)
            _bucket_expand(y[:, cols], vb.mul(_coef(scale, bk)).to(xs.dtype), B, bk)


def bottleneck(
    h: torch.Tensor,  # [num_tokens, d] (in place)
    D: torch.Tensor,  # [num_slots, r_max, d]   down projection
    U: torch.Tensor,  # [num_slots, d, r_max]   up projection
    bd: torch.Tensor | None,  # [num_slots, r_max]  down bias
    bu: torch.Tensor | None,  # [num_slots, d]      up bias
    act: torch.Tensor,  # [num_slots] int: 0=relu, 1=gelu (erf), 2=silu
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0:
    z = act_s(D[s, :r_s] @ h[t] + bd[s, :r_s]); h[t] += U[s, :, :r_s] @ z + bu[s]

    In place; each row's delta is computed from the old h before h is written."""
    _check(plan, h)
    dims = 2 * h.shape[1]

    def body(hr, outr, s, r):  # hr and outr may be the same rows: z first
        z = hr @ D[s, :r].t()
        if bd is not None:
            z += bd[s, :r]
        z = _activate(z, act[s])
        if bu is None:
            outr.addmm_(z, U[s, :, :r].t())
        else:
            outr += torch.addmm(bu[s], z, U[s, :, :r].t())

    _runs(plan, h, h, dims, 2, body)
    for bk in _bmm_buckets(plan, dims, 2):
        R = bk.rank
        z = _bucket_shrink(_gather_rows(h, bk), D, bk, 0, R)
        if bd is not None:
            z += _per_group(bd[:, :R], bk)[:, None, :]
        z = _activate(z, _per_group(act, bk).view(-1, 1, 1))
        if bk.mask is not None:
            z.mul_(bk.mask)
        bias = None
        if bu is not None:  # zero on pad rows, which index_add onto real rows
            bias = _per_group(bu, bk)[:, None, :]
            bias = bias if bk.mask is None else bias * bk.mask[..., :1]
        _bucket_expand(h, z, U, bk, bias)


def ia3(
    y: torch.Tensor,  # [num_tokens, d] (in place)
    vec: torch.Tensor,  # [num_slots, d]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] *= vec[s]"""
    _check(plan, y)
    rows = plan.active_rows
    if rows.numel():
        y.index_copy_(0, rows, y.index_select(0, rows) * vec.index_select(0, plan.active_slots))
