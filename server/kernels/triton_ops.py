"""Triton kernels for the LoRA ops: SGMV tiles and a split-K shrink.

Semantics: ``server.kernels.reference``. Status (issue 17): every test run
executes these kernels on CPU tensors under ``TRITON_INTERPRET=1``
(tests/unit/test_kernels_triton.py); ``make gpu-check`` compiles and tests them
on CUDA but has not yet run on a GPU, so ``--kernels auto`` does not pick this
module: only ``--kernels triton`` does.

Design (punica's SGMV, with split-K from its shrink):

* The plan's ``tiles`` give each program up to ``TILE_ROWS`` rows of ONE slot
  (rows sorted by slot), so a slot's A/B blocks are read once per tile, not
  once per row: 64 rows of one popular adapter read its weights 4 times.
  Rows with slot -1 are in no tile: never read, never written.
* ``shrink``: grid ``(n_tiles, split_k)``; program (i, k) computes
  ``x[rows, K_k] @ A[s, :R, K_k]^T`` over its share ``K_k`` of d_in into an
  fp32 partial ``part[k, rows]``; one torch ``sum`` adds the split_k partials
  (deterministic, no atomics). split_k grows when tiles are few and d_in is
  large, so a decode step with few adapters still fills the GPU.
* ``expand``: grid ``(n_tiles, cdiv(d_out, BLOCK_N))``; each program owns its
  rows x BLOCK_N columns of y, so y is updated without atomics.
* Rank: columns ``>= r_s`` of A, B and v are masked on load (never read; a
  packed A masks per target: column c is used iff ``c % r_max < r_s``).
* bf16 in, fp32 accumulate: ``tl.dot`` on the input dtype into an fp32
  accumulator; fp32 inputs use ``input_precision="ieee"`` (no TF32). ``lora``
  keeps v in fp32 between shrink and expand, as the reference does; expand
  casts it to B's dtype for the dot.
* Any strides (transposed x, column slices of a fused y, the engine's
  transposed B). ``bottleneck``, ``ia3`` and ``col_scale`` are ``torch_ops``'.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import triton
import triton.language as tl
from triton import knobs

from server.kernels import torch_ops
from server.kernels.plan import TILE_ROWS, AdapterPlan

NAME = "triton"
LAYOUT = {"shrink": "tiles", "expand": "tiles", "lora": "tiles", "lora_packed": "tiles",
          "bottleneck": "batches", "ia3": "rows", "col_scale": "rows"}  # plan layout each op reads
INTERPRETED = bool(knobs.runtime.interpret)  # kernels below were built for the interpreter
bottleneck = torch_ops.bottleneck
ia3 = torch_ops.ia3
col_scale = torch_ops.col_scale  # one gather-multiply-scatter: no kernel of its own (yet)


@cache
def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: split_k is raised towards this."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: few programs, but enough that tests exercise split_k > 1


def _blocks(device: torch.device) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_N). Smaller under the interpreter so that small test
    shapes still cross block boundaries; same code either way."""
    return (64, 64) if device.type == "cuda" else (32, 32)


def _dot_f32(dtype: torch.dtype) -> bool:
    """Dot in float32 ("ieee", no TF32) for fp32 inputs, and under the
    interpreter for all: its tl.dot multiplies bf16 bit patterns
    (triton-lang/triton#11584, "not supported yet"; its docs say to upcast).
    Compiled, bf16 inputs go to the tensor cores with an fp32 accumulator."""
    return dtype == torch.float32 or INTERPRETED


@triton.jit
def _tile(tiles_ptr, rows_ptr, ranks_ptr, tile, BLOCK_M: tl.constexpr):
    """One tile's slot, that slot's rank, its (up to BLOCK_M) token rows and their mask."""
    start = tl.load(tiles_ptr + tile * 3)
    end = tl.load(tiles_ptr + tile * 3 + 1)
    s = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    return s, tl.load(ranks_ptr + s), tl.load(rows_ptr + offs_m, mask=m_ok, other=0), m_ok


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, part_ptr, rows_ptr, tiles_ptr, ranks_ptr,
                   d_in, k_per_split, r_group, width,
                   sx_t, sx_k, sa_s, sa_r, sa_k, sp_k, sp_t, sp_r,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP32: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    s, rank, rows, m_ok = _tile(tiles_ptr, rows_ptr, ranks_ptr, tile, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = (offs_r < width) & (offs_r % r_group < rank)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * sx_t + offs_k[None, :] * sx_k,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_ptr + s * sa_s + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        if FP32:
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at.to(xt.dtype), acc)
    out = part_ptr + split * sp_k + rows[:, None] * sp_t + offs_r[None, :] * sp_r
    tl.store(out, acc, mask=m_ok[:, None] & (offs_r < width)[None, :])


@triton.jit
def _expand_kernel(y_ptr, v_ptr, b_ptr, scale_ptr, rows_ptr, tiles_ptr, ranks_ptr, d_out,
                   sy_t, sy_n, sv_t, sv_r, sb_s, sb_n, sb_r, ss,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    s, rank, rows, m_ok = _tile(tiles_ptr, rows_ptr, ranks_ptr, tile, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < d_out
    vt = tl.load(v_ptr + rows[:, None] * sv_t + offs_r[None, :] * sv_r,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
    bt = tl.load(b_ptr + s * sb_s + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
    if FP32:
        acc = tl.dot(vt.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(vt.to(bt.dtype), bt, out_dtype=tl.float32)
    acc = acc * tl.load(scale_ptr + s * ss).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * sy_t + offs_n[None, :] * sy_n
    ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


def _split_k(n_tiles: int, d_in: int, block_k: int, device: torch.device) -> int:
    """Slices of d_in per tile: enough programs to fill the device, each
    slice a whole number of blocks. Returns k_per_split (a multiple of block_k)."""
    blocks = triton.cdiv(d_in, block_k)
    split = max(1, min(blocks, _target_programs(device) // max(1, n_tiles)))
    return triton.cdiv(blocks, split) * block_k


def _shrink_f32(x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan, n_groups: int = 1
                ) -> torch.Tensor:  # [num_tokens, A.shape[1]] float32
    """x [T, d_in], A [S, width, d_in] with width = n_groups * r_group: the
    shrink of every group (target) of a packed A in one launch, in float32."""
    T, d_in = x.shape
    width = A.shape[1]
    n_tiles = plan.tiles.shape[0]
    if n_tiles == 0 or d_in == 0:
        return torch.zeros(T, width, dtype=torch.float32, device=x.device)
    block_k, _ = _blocks(x.device)
    k_per_split = _split_k(n_tiles, d_in, block_k, x.device)
    split = triton.cdiv(d_in, k_per_split)
    part = torch.zeros(split, T, width, dtype=torch.float32, device=x.device)
    _shrink_kernel[(n_tiles, split)](
        x, A, part, plan.sorted_rows, plan.tiles, plan.slot_ranks,
        d_in, k_per_split, width // n_groups, width,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        BLOCK_M=TILE_ROWS, BLOCK_R=max(16, triton.next_power_of_2(width)), BLOCK_K=block_k,
        FP32=_dot_f32(x.dtype),
    )
    return part[0] if split == 1 else part.sum(0)


def _check(plan: AdapterPlan, *tensors: torch.Tensor) -> None:
    plan.need("tiles")
    for t in tensors:
        if t.shape[0] != plan.num_tokens:
            raise ValueError(f"batch has {t.shape[0]} rows, plan has {plan.num_tokens}")


def shrink(x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan) -> torch.Tensor:
    """See reference.shrink."""
    _check(plan, x)
    return _shrink_f32(x, A, plan).to(x.dtype)


def expand(y: torch.Tensor, v: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, plan: AdapterPlan) -> None:
    """See reference.expand."""
    _check(plan, y, v)
    n_tiles, d_out = plan.tiles.shape[0], y.shape[1]
    if n_tiles == 0 or d_out == 0:
        return
    _, block_n = _blocks(y.device)
    _expand_kernel[(n_tiles, triton.cdiv(d_out, block_n))](
        y, v, B, scale, plan.sorted_rows, plan.tiles, plan.slot_ranks, d_out,
        y.stride(0), y.stride(1), v.stride(0), v.stride(1),
        B.stride(0), B.stride(1), B.stride(2), scale.stride(0),
        BLOCK_M=TILE_ROWS, BLOCK_R=max(16, triton.next_power_of_2(B.shape[2])),
        BLOCK_N=block_n, FP32=_dot_f32(B.dtype),
    )


def lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         plan: AdapterPlan) -> None:
    """See reference.lora. v stays float32 between the two kernels."""
    _check(plan, y, x)
    if plan.tiles.shape[0]:
        expand(y, _shrink_f32(x, A, plan), B, scale, plan)


def lora_packed(y: torch.Tensor, x: torch.Tensor, A_packed: torch.Tensor, B_list: Sequence[torch.Tensor],
                scales: Sequence[torch.Tensor], out_slices: Sequence[slice], plan: AdapterPlan) -> None:
    """See reference.lora_packed. One shrink launch for all targets, then one
    expand per target into its column slice of y."""
    _check(plan, y, x)
    if not plan.tiles.shape[0]:
        return
    n = len(B_list)
    r_max = A_packed.shape[1] // n
    v = _shrink_f32(x, A_packed, plan, n_groups=n)  # [T, n * r_max]
    for i, (B, scale, cols) in enumerate(zip(B_list, scales, out_slices, strict=True)):
        expand(y[:, cols], v[:, i * r_max : (i + 1) * r_max], B, scale, plan)
