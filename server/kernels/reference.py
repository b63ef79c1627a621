"""Reference batched adapter ops: plain Python loops over rows, in float32.

This module is *the definition* of every op in ``server.kernels`` and the only
place its contract is written (the signatures alone are in ``contract.py``);
the fast paths (``torch_ops``, ``triton_ops``) say "see reference.<op>" and are
tested against it. Every op upcasts its inputs to float32, loops over the rows
of the batch one at a time and casts the result back to the dtype of its
output tensor. It is slow on purpose.

Common conventions (shared by all implementations):

* ``plan.slots[t]`` is row t's device slot, ``-1`` meaning "no adapter".
* ``plan.slot_ranks[s]`` is slot s's true rank ``r_s`` (1 <= r_s <= r_max).
  Only the first ``r_s`` rank rows of ``A``/``D`` and rank columns of
  ``B``/``U``/``v`` are read; the padded ones may hold any finite values.
* ``shrink`` writes exact zeros in rows with slot -1 and in rank columns
  ``>= r_s``.
* ``expand``, ``lora``, ``lora_packed``, ``bottleneck``, ``ia3`` and ``col_scale`` update their
  output tensor IN PLACE (any strided view works, e.g. a column slice of a
  packed q/k/v output) and return None. Rows with slot -1 are left untouched
  (bit-identical). ``shrink`` returns a new tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.kernels.activation import Activation
from server.kernels.plan import AdapterPlan  # only .slots and .slot_ranks are read here

NAME = "reference"
LAYOUT = dict.fromkeys(("shrink", "expand", "lora", "lora_packed", "bottleneck", "ia3", "col_scale"), "rows")


def _rows(plan: AdapterPlan) -> list[tuple[int, int, int]]:
    """(row t, slot s, rank r_s) for every row that has an adapter."""
    ranks = plan.slot_ranks.tolist()
    return [(t, s, ranks[s]) for t, s in enumerate(plan.slots.tolist()) if s >= 0]


def _shrink_f32(x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan) -> torch.Tensor:
    v = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    for t, s, r in _rows(plan):
        v[t, :r] = A[s, :r].float() @ x[t].float()
    return v


def shrink(
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    plan: AdapterPlan,
) -> torch.Tensor:  # [num_tokens, r_max], dtype of x
    """for t: s = slots[t]; v[t] = 0; if s >= 0: v[t, :r_s] = A[s, :r_s] @ x[t]"""
    return _shrink_f32(x, A, plan).to(x.dtype)


def expand(
    y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
    v: torch.Tensor,  # [num_tokens, r_max]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] += scale[s] * B[s, :, :r_s] @ v[t, :r_s]"""
    for t, s, r in _rows(plan):
        delta = scale[s].float() * (B[s, :, :r].float() @ v[t, :r].float())
        y[t] = (y[t].float() + delta).to(y.dtype)


def lora(
    y: torch.Tensor,  # [num_tokens, d_out] (in place)
    x: torch.Tensor,  # [num_tokens, d_in]
    A: torch.Tensor,  # [num_slots, r_max, d_in]
    B: torch.Tensor,  # [num_slots, d_out, r_max]
    scale: torch.Tensor,  # [num_slots]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0:
    y[t] += scale[s] * B[s, :, :r_s] @ (A[s, :r_s] @ x[t])   (v kept in float32)"""
    expand(y, _shrink_f32(x, A, plan), B, scale, plan)


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
    [i*r_max, (i+1)*r_max) of A_packed. for i: lora(y[:, out_slices[i]], x,
    A_packed[:, i*r_max:(i+1)*r_max], B_list[i], scales[i], plan)"""
    r_max = A_packed.shape[1] // len(B_list)
    for i, (B, scale, cols) in enumerate(zip(B_list, scales, out_slices, strict=True)):
        lora(y[:, cols], x, A_packed[:, i * r_max : (i + 1) * r_max], B, scale, plan)


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
    z = act_s(D[s, :r_s] @ h[t] + bd[s, :r_s]); h[t] += U[s, :, :r_s] @ z + bu[s]"""
    acts = act.tolist()
    for t, s, r in _rows(plan):
        h32 = h[t].float()
        z = D[s, :r].float() @ h32
        if bd is not None:
            z = z + bd[s, :r].float()
        out = U[s, :, :r].float() @ Activation(int(acts[s])).fn(z)
        if bu is not None:
            out = out + bu[s].float()
        h[t] = (h32 + out).to(h.dtype)


def ia3(
    y: torch.Tensor,  # [num_tokens, d] (in place)
    vec: torch.Tensor,  # [num_slots, d]
    plan: AdapterPlan,
) -> None:
    """for t: s = slots[t]; if s >= 0: y[t] *= vec[s]"""
    for t, s, _ in _rows(plan):
        y[t] = (y[t].float() * vec[s].float()).to(y.dtype)


def col_scale(
    y: torch.Tensor,  # [num_tokens, d] (in place)
    scale: torch.Tensor,  # [num_slots, d]
    shift: torch.Tensor | None,  # [num_slots, d]
    plan: AdapterPlan,
) -> None:
    """Per-slot output column scale and shift (DoRA's m / ||W + sBA||, applied after the LoRA add;
    a LoRA bias is scale 1, shift s * b). plan.slot_ranks are not read.
    for t: s = slots[t]; if s >= 0: y[t] = scale[s] * y[t] + (shift[s] if shift is not None else 0)"""
    for t, s, _ in _rows(plan):
        out = y[t].float() * scale[s].float()
        if shift is not None:
            out = out + shift[s].float()
        y[t] = out.to(y.dtype)
