"""Batched adapter ops in plain torch (CPU and GPU): many adapters, one pass.

Semantics: ``server.kernels.reference`` (the only copy of each op's contract).
How rows are batched (segments, view/gather buckets, rank buckets, the SGMV
loop) is decided once per step by ``server.kernels.plan.make_plan``; this
module executes a plan. Dtypes: x, weights and y share one dtype; v (the
rank-space activation) is kept in that dtype; scales are applied to v. Only
the engine thread calls these, and no op keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.kernels.activation import apply_per_row
from server.kernels.plan import LOOP_MM_COST, AdapterPlan, Bucket

NAME = "torch"
LAYOUT = {"shrink": "batches", "expand": "batches", "lora": "batches", "lora_packed": "batches",
          "bottleneck": "batches", "ia3": "rows", "col_scale": "rows"}  # plan layout each op reads

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
    plan.need("batches")
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


def _has_runs(plan: AdapterPlan, dims: int, mats: int) -> bool:
    """`_runs` will call its body (there are segments or loop buckets)."""
    plan.need("batches")
    return bool(plan.segments) or any(_loop(plan, bk, dims, mats) for bk in plan.buckets)


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
    masked; bias [G, L|1, d_out] must be zero on pad rows."""
    out = torch.bmm(vb, _expand_weights(B, bk, vb.shape[-1]))
    if bias is not None:
        out += bias
    y.index_add_(0, bk.gidx, out.view(-1, B.shape[1]))


def _expand_weights(B: torch.Tensor, bk: Bucket, R: int) -> torch.Tensor:
    """[G, R, d_out]: each group's B_g[:, :R]^T. B may be a transposed view of a contiguous
    [S, r_max, d_out] stack (the engine's layout): then the bmm reads contiguous rows, ~3x
    faster on CPU than the [S, d_out, r_max] layout."""
    Bt = B.transpose(1, 2)  # [S, r_max, d_out]
    if bk.first_slot >= 0:
        return Bt[bk.first_slot : bk.first_slot + bk.num_groups, :R]
    if Bt.is_contiguous():
        return Bt[:, :R].index_select(0, bk.group_slots)
    if R == B.shape[-1] and B.is_contiguous():
        return B.flatten(1).index_select(0, bk.group_slots).view(-1, *B.shape[1:]).transpose(1, 2)
    return B[:, :, :R].index_select(0, bk.group_slots).transpose(1, 2)


def _tile_columns(out_slices: Sequence[slice], width: int) -> bool:
    """The slices cover columns [0, width) in order, each contiguous."""
    end = 0
    for c in out_slices:
        if c.start != end or c.step not in (None, 1):
            return False
        end = c.stop
    return end == width


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


def shrink(x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan) -> torch.Tensor:
    """See reference.shrink."""
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


def expand(y: torch.Tensor, v: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, plan: AdapterPlan) -> None:
    """See reference.expand."""
    _check(plan, y, v)
    d_out = y.shape[1]

    host = _host(scale) if _has_runs(plan, d_out, 1) else None

    def body(vr, yr, s, r):
        if host is None:
            yr.addmm_(vr[:, :r] * scale[s], B[s, :, :r].t())
        else:
            yr.addmm_(vr[:, :r], B[s, :, :r].t(), alpha=host[s])

    _runs(plan, v, y, d_out, 1, body)
    for bk in _bmm_buckets(plan, d_out, 1):
        _bucket_expand(y, _gather_rows(v[:, : bk.rank], bk).mul_(_coef(scale, bk)), B, bk)


def lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         plan: AdapterPlan) -> None:
    """See reference.lora."""
    _check(plan, y, x)
    dims = x.shape[1] + y.shape[1]

    host = _host(scale) if _has_runs(plan, dims, 2) else None

    def body(xr, yr, s, r):
        _addmm_scaled(yr, xr @ A[s, :r].t(), B[s, :, :r].t(), scale, host, s)

    _runs(plan, x, y, dims, 2, body)
    for bk in _bmm_buckets(plan, dims, 2):
        vb = _bucket_shrink(_gather_rows(x, bk), A, bk, 0, bk.rank)
        _bucket_expand(y, vb.mul_(_coef(scale, bk)), B, bk)


def lora_packed(y: torch.Tensor, x: torch.Tensor, A_packed: torch.Tensor, B_list: Sequence[torch.Tensor],
                scales: Sequence[torch.Tensor], out_slices: Sequence[slice], plan: AdapterPlan) -> None:
    """See reference.lora_packed. One gather of x and, when a bucket has
    R == r_max, one shrink for all targets."""
    _check(plan, y, x)
    n = len(B_list)
    r_max = A_packed.shape[1] // n
    targets = list(zip(B_list, scales, out_slices, strict=True))
    dims = n * x.shape[1] + sum(B.shape[1] for B in B_list)

    hosts = [_host(scale) for scale in scales] if _has_runs(plan, dims, 2 * n) else [None] * n

    def body(xr, yr, s, r):
        for i, (B, scale, cols) in enumerate(targets):
            vr = xr @ A_packed[s, i * r_max : i * r_max + r].t()
            _addmm_scaled(yr[:, cols], vr, B[s, :, :r].t(), scale, hosts[i], s)

    _runs(plan, x, y, dims, 2 * n, body)
    whole = _tile_columns(out_slices, y.shape[1])
    for bk in _bmm_buckets(plan, dims, 2 * n):
        xs = _gather_rows(x, bk)
        R = bk.rank
        if R == r_max:  # one shrink for all targets
            v_all = _bucket_shrink(xs, A_packed, bk, 0, n * R)
        outs = []
        for i, (B, scale, cols) in enumerate(targets):
            vb = v_all[..., i * R : (i + 1) * R] if R == r_max else \
                _bucket_shrink(xs, A_packed, bk, i * r_max, R)
            vb = vb.mul(_coef(scale, bk)).to(xs.dtype)
            if whole:
                outs.append(torch.bmm(vb, _expand_weights(B, bk, R)))
            else:
                _bucket_expand(y[:, cols], vb, B, bk)
        if whole:  # one scatter into contiguous y (index_add_ on a column slice is ~5x slower)
            y.index_add_(0, bk.gidx, torch.cat(outs, -1).view(-1, y.shape[1]))


def bottleneck(h: torch.Tensor, D: torch.Tensor, U: torch.Tensor, bd: torch.Tensor | None,
               bu: torch.Tensor | None, act: torch.Tensor, plan: AdapterPlan) -> None:
    """See reference.bottleneck. Each row's delta is computed from the old h
    before h is written."""
    _check(plan, h)
    dims = 2 * h.shape[1]

    def body(hr, outr, s, r):  # hr and outr may be the same rows: z first
        z = hr @ D[s, :r].t()
        if bd is not None:
            z += bd[s, :r]
        z = apply_per_row(z, act[s])
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
        z = apply_per_row(z, _per_group(act, bk).view(-1, 1, 1))
        if bk.mask is not None:
            z.mul_(bk.mask)
        bias = None
        if bu is not None:  # zero on pad rows, which index_add onto real rows
            bias = _per_group(bu, bk)[:, None, :]
            bias = bias if bk.mask is None else bias * bk.mask[..., :1]
        _bucket_expand(h, z, U, bk, bias)


def ia3(y: torch.Tensor, vec: torch.Tensor, plan: AdapterPlan) -> None:
    """See reference.ia3."""
    _check(plan, y)
    rows = plan.active_rows
    if rows.numel():
        y.index_copy_(0, rows, y.index_select(0, rows) * vec.index_select(0, plan.active_slots))


def col_scale(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, plan: AdapterPlan) -> None:
    """See reference.col_scale. One gather of the active rows, one multiply(-add), one scatter."""
    _check(plan, y)
    rows = plan.active_rows
    if rows.numel():
        out = y.index_select(0, rows).mul_(scale.index_select(0, plan.active_slots))
        if shift is not None:
            out += shift.index_select(0, plan.active_slots)
        y.index_copy_(0, rows, out)
