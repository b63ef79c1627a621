"""Triton CUDA kernels for the batched adapter ops (BGMV: one program per row).

UNTESTED ON HARDWARE. This module was written without a GPU and without
triton installed; it has never been compiled or run. ``server.kernels``
imports it only when the tensors are on CUDA and ``triton`` is importable, and
``tests/unit/test_kernels*.py`` run every property test on CUDA too when a GPU
is present, so the first GPU CI run is its first real test.

Semantics are those of ``server.kernels.reference``. Design (punica's BGMV):

* ``shrink``: grid ``(T,)``; program t reads ``s = slots[t]`` and
  ``r = slot_ranks[s]`` and computes ``v[t, :r] = A[s, :r] @ x[t]`` over d_in
  in blocks of ``BLOCK_K``, accumulating in float32. Rows with ``s = -1`` get
  ``r = 0``: every weight load is masked off (no weight traffic), v[t] = 0.
  Rank columns ``>= r`` are masked, so padded ranks are never read.
* ``expand``: grid ``(T, cdiv(d_out, BLOCK_N))``; each program owns one row
  and one block of output columns, so ``y`` is updated without atomics:
  ``y[t, n] += scale[s] * sum_j B[s, n, j] * v[t, j]`` for ``j < r``; rows with
  ``s = -1`` are not written at all (bit-identical).
* Arbitrary strides everywhere (column slices of a packed output, transposed
  x), so ``lora_packed`` passes views per target.
* Prefill-shaped plans (only long segments, no bucketed rows) go to the
  ``torch_ops`` segment path: one cuBLAS GEMM per segment beats a per-row
  matvec there. ``bottleneck`` and ``ia3`` use the ``torch_ops`` paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from server.kernels import torch_ops
from server.kernels.torch_ops import AdapterPlan

bottleneck = torch_ops.bottleneck
ia3 = torch_ops.ia3
BLOCK_K = 128  # shrink: d_in block
BLOCK_N = 64  # expand: d_out block per program


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, v_ptr, slots_ptr, ranks_ptr, d_in, r_max,
                   sx_t, sx_k, sa_s, sa_r, sa_k, sv_t, sv_r,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.load(slots_ptr + t).to(tl.int64)
    s_safe = tl.maximum(s, 0)
    rank = tl.where(s >= 0, tl.load(ranks_ptr + s_safe), 0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d_in
        xk = tl.load(x_ptr + t * sx_t + offs_k * sx_k, mask=k_ok & (rank > 0), other=0.0)
        a = tl.load(a_ptr + s_safe * sa_s + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
    tl.store(v_ptr + t * sv_t + offs_r * sv_r, acc.to(v_ptr.dtype.element_ty), mask=offs_r < r_max)


@triton.jit
def _expand_kernel(y_ptr, v_ptr, b_ptr, scale_ptr, slots_ptr, ranks_ptr, d_out,
                   sy_t, sy_n, sv_t, sv_r, sb_s, sb_n, sb_r, ss,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    s = tl.load(slots_ptr + t).to(tl.int64)
    s_safe = tl.maximum(s, 0)
    rank = tl.where(s >= 0, tl.load(ranks_ptr + s_safe), 0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = offs_r < rank
    n_ok = (offs_n < d_out) & (s >= 0)
    vt = tl.load(v_ptr + t * sv_t + offs_r * sv_r, mask=r_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + s_safe * sb_s + offs_n[:, None] * sb_n + offs_r[None, :] * sb_r,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    sc = tl.load(scale_ptr + s_safe * ss).to(tl.float32)
    out = tl.sum(b.to(tl.float32) * vt[None, :], axis=1) * sc
    y_ptrs = y_ptr + t * sy_t + offs_n * sy_n
    y = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + out).to(y_ptr.dtype.element_ty), mask=n_ok)


def _shrink_into(v: torch.Tensor, x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan) -> None:
    """v [T, r_max] (any dtype) <- shrink of x [T, d_in] by A [S, r_max, d_in] (a view is fine)."""
    T, d_in = x.shape
    if T == 0:
        return
    _shrink_kernel[(T,)](
        x, A, v, plan.slots, plan.slot_ranks, d_in, A.shape[1],
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), v.stride(0), v.stride(1),
        BLOCK_R=triton.next_power_of_2(A.shape[1]), BLOCK_K=BLOCK_K,
    )


def shrink(
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    plan: AdapterPlan,
) -> torch.Tensor:  # [num_tokens, r_max], dtype of x
    """for t: s = slots[t]; v[t] = 0; if s >= 0: v[t, :r_s] = A[s, :r_s] @ x[t]"""
    v = x.new_empty(x.shape[0], A.shape[1])
    _shrink_into(v, x, A, plan)
    return v


def expand(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    v: torch.Tensor,  # [num_tokens, r_max]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] += scale[s] * B[s, :, :r_s] @ v[t, :r_s]"""
    T, d_out = y.shape
    if T == 0:
        return
    grid = (T, triton.cdiv(d_out, BLOCK_N))
    _expand_kernel[grid](
        y, v, B, scale, plan.slots, plan.slot_ranks, d_out,
        y.stride(0), y.stride(1), v.stride(0), v.stride(1),
        B.stride(0), B.stride(1), B.stride(2), scale.stride(0),
        BLOCK_R=triton.next_power_of_2(B.shape[2]), BLOCK_N=BLOCK_N,
    )


def lora(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0:
    y[t] += scale[s] * B[s, :, :r_s] @ (A[s, :r_s] @ x[t])   (v kept in float32)"""
    if not plan.buckets:  # prefill-shaped (or empty): GEMM per segment
        torch_ops.lora(y, x, A, B, scale, plan)
        return
    v = torch.empty(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    _shrink_into(v, x, A, plan)
    expand(y, v, B, scale, plan)


def lora_packed(
    y: torch.Tensor,  # [num_tokens, sum(d_out_i)] (in place)
    x: torch.Tensor,  # [num_tokens, d_in]
    A_packed: torch.Tensor,  # [num_slots, n_targets * r_max, d_in]
    B_list: Sequence[torch.Tensor],  # n_targets x [num_slots, d_out_i, r_max]
    scales: Sequence[torch.Tensor],  # n_targets x [num_slots]
    out_slices: Sequence[slice],  # n_targets column slices of y, width d_out_i
    plan: AdapterPlan,
) -> None:
    """Per target i: lora(y[:, out_slices[i]], x, A_packed[:, i*r_max:(i+1)*r_max],
    B_list[i], scales[i], plan) -- see reference.lora_packed."""
    if not plan.buckets:
        torch_ops.lora_packed(y, x, A_packed, B_list, scales, out_slices, plan)
        return
    n = len(B_list)
    r_max = A_packed.shape[1] // n
    v = torch.empty(x.shape[0], n * r_max, dtype=torch.float32, device=x.device)
    for i, (B, scale, cols) in enumerate(zip(B_list, scales, out_slices, strict=True)):
        rows = slice(i * r_max, (i + 1) * r_max)
        _shrink_into(v[:, rows], x, A_packed[:, rows], plan)
        expand(y[:, cols], v[:, rows], B, scale, plan)
