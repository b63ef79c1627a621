"""Batched adapter kernels: apply a different adapter to every row of one batch.

Public ops (semantics: ``server.kernels.reference``, the float32 per-row loop):

    plan = make_plan(slots, slot_ranks)          # once per forward step
    v = shrink(x, A, plan)                       # [T, r_max]
    expand(y, v, B, scale, plan)                 # y += scale * v @ B^T, in place
    lora(y, x, A, B, scale, plan)                # shrink + expand, in place
    lora_packed(y, x, A_packed, B_list, scales, out_slices, plan)  # q/k/v, gate/up
    bottleneck(h, D, U, bd, bu, act, plan)       # h += U act(D h + bd) + bu, in place
    ia3(y, vec, plan)                            # y *= vec[slot], in place

Dispatch is decided once per device, never per call by trial: CUDA tensors
with Triton importable use ``triton_ops`` (BGMV kernels for shrink/expand);
everything else uses ``torch_ops``. The shape class (decode rows vs prefill
segments, rank buckets, view vs gather) is decided by ``make_plan``, once per
step. ``from server.kernels import reference`` gives the reference versions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache
from types import ModuleType

import torch

from server.kernels import reference, torch_ops
from server.kernels.torch_ops import AdapterPlan, make_plan

__all__ = [
    "AdapterPlan", "make_plan", "shrink", "expand", "lora", "lora_packed",
    "bottleneck", "ia3", "reference", "backend",
]

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@cache
def backend(device: torch.device) -> ModuleType:
    """The implementation module used for tensors on `device` (decided once)."""
    if device.type == "cuda" and _HAS_TRITON and torch.cuda.is_available():
        from server.kernels import triton_ops

        return triton_ops
    return torch_ops


def shrink(
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    plan: AdapterPlan,
) -> torch.Tensor:  # [num_tokens, r_max]
    """for t: s = slots[t]; v[t] = 0; if s >= 0: v[t, :r_s] = A[s, :r_s] @ x[t]"""
    return backend(x.device).shrink(x, A, plan)


def expand(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    v: torch.Tensor,  # [num_tokens, r_max]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] += scale[s] * B[s, :, :r_s] @ v[t, :r_s]"""
    backend(y.device).expand(y, v, B, scale, plan)


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
    backend(y.device).lora(y, x, A, B, scale, plan)


def lora_packed(
    y: torch.Tensor,  # [num_tokens, sum(d_out_i)] (in place)
    x: torch.Tensor,  # [num_tokens, d_in]
    A_packed: torch.Tensor,  # [num_slots, n_targets * r_max, d_in]
    B_list: Sequence[torch.Tensor],  # n_targets x [num_slots, d_out_i, r_max]
    scales: Sequence[torch.Tensor],  # n_targets x [num_slots]
    out_slices: Sequence[slice],  # n_targets column slices of y, width d_out_i
    plan: AdapterPlan,
) -> None:
    """r_max = A_packed.shape[1] // n_targets; for t: s = slots[t]; if s >= 0: for i:
    y[t, out_slices[i]] += scales[i][s] * B_i[s, :, :r_s] @ (A_packed[s, i*r_max:][:r_s] @ x[t])"""
    backend(y.device).lora_packed(y, x, A_packed, B_list, scales, out_slices, plan)


def bottleneck(
    h: torch.Tensor,  # [num_tokens, d] (in place)
    D: torch.Tensor,  # [num_slots, r_max, d]
    U: torch.Tensor,  # [num_slots, d, r_max]
    bd: torch.Tensor | None,  # [num_slots, r_max]
    bu: torch.Tensor | None,  # [num_slots, d]
    act: torch.Tensor,  # [num_slots] int: 0=relu, 1=gelu (erf), 2=silu
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0:
    z = act_s(D[s, :r_s] @ h[t] + bd[s, :r_s]); h[t] += U[s, :, :r_s] @ z + bu[s]"""
    backend(h.device).bottleneck(h, D, U, bd, bu, act, plan)


def ia3(
    y: torch.Tensor,  # [num_tokens, d] (in place)
    vec: torch.Tensor,  # [num_slots, d]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] *= vec[s]"""
    backend(y.device).ia3(y, vec, plan)
