"""The backend contract: the ops every kernel backend module provides.

``reference``, ``torch_ops`` and ``triton_ops`` are modules that satisfy
``KernelBackend`` structurally (a type checker accepts a module for a
Protocol); ``tests/unit/test_kernels_plan.py`` checks their signatures against
it. The meaning of each op (per-row pseudo-loop, shapes, in-place rules) is
written once, in ``server.kernels.reference``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from server.kernels.plan import AdapterPlan

OPS = ("shrink", "expand", "lora", "lora_packed", "bottleneck", "ia3", "col_scale")


class KernelBackend(Protocol):
    """One implementation of every op; semantics: see reference.<op>."""

    NAME: str  # "reference" | "torch" | "triton"

    def shrink(
        self,
        x: torch.Tensor,  # [num_tokens, d_in]
        A: torch.Tensor,  # [num_slots, r_max, d_in]
        plan: AdapterPlan,
    ) -> torch.Tensor:  # [num_tokens, r_max], dtype of x
        ...

    def expand(
        self,
        y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
        v: torch.Tensor,  # [num_tokens, r_max]
        B: torch.Tensor,  # [num_slots, d_out, r_max]
        scale: torch.Tensor,  # [num_slots]
        plan: AdapterPlan,
    ) -> None:
        ...

    def lora(
        self,
        y: torch.Tensor,  # [num_tokens, d_out] (in place, any strided view)
        x: torch.Tensor,  # [num_tokens, d_in]
        A: torch.Tensor,  # [num_slots, r_max, d_in]
        B: torch.Tensor,  # [num_slots, d_out, r_max]
        scale: torch.Tensor,  # [num_slots]
        plan: AdapterPlan,
    ) -> None:
        ...

    def lora_packed(
        self,
        y: torch.Tensor,  # [num_tokens, sum(d_out_i)] (in place)
        x: torch.Tensor,  # [num_tokens, d_in]
        A_packed: torch.Tensor,  # [num_slots, n_targets * r_max, d_in]
        B_list: Sequence[torch.Tensor],  # n_targets x [num_slots, d_out_i, r_max]
        scales: Sequence[torch.Tensor],  # n_targets x [num_slots]
        out_slices: Sequence[slice],  # n_targets column slices of y, width d_out_i
        plan: AdapterPlan,
    ) -> None:
        ...

    def bottleneck(
        self,
        h: torch.Tensor,  # [num_tokens, d] (in place)
        D: torch.Tensor,  # [num_slots, r_max, d]
        U: torch.Tensor,  # [num_slots, d, r_max]
        bd: torch.Tensor | None,  # [num_slots, r_max]
        bu: torch.Tensor | None,  # [num_slots, d]
        act: torch.Tensor,  # [num_slots] int: 0=relu, 1=gelu (erf), 2=silu
        plan: AdapterPlan,
    ) -> None:
        ...

    def ia3(
        self,
        y: torch.Tensor,  # [num_tokens, d] (in place)
        vec: torch.Tensor,  # [num_slots, d]
        plan: AdapterPlan,
    ) -> None:
        ...

    def col_scale(
        self,
        y: torch.Tensor,  # [num_tokens, d] (in place)
        scale: torch.Tensor,  # [num_slots, d]
        shift: torch.Tensor | None,  # [num_slots, d]
        plan: AdapterPlan,
    ) -> None:
        ...
