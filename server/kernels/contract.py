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
    """One implementation of every op; semantics and every argument's shape: see reference.<op>."""

    NAME: str  # "reference" | "torch" | "triton"
    LAYOUT: dict[str, str]  # op -> the plan layout it reads: "rows" | "batches" | "tiles" (plan.py)

    def shrink(self, x: torch.Tensor, A: torch.Tensor, plan: AdapterPlan) -> torch.Tensor: ...

    def expand(self, y: torch.Tensor, v: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
               plan: AdapterPlan) -> None: ...

    def lora(self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             plan: AdapterPlan) -> None: ...

    def lora_packed(self, y: torch.Tensor, x: torch.Tensor, A_packed: torch.Tensor,
                    B_list: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                    out_slices: Sequence[slice], plan: AdapterPlan) -> None: ...

    def bottleneck(self, h: torch.Tensor, D: torch.Tensor, U: torch.Tensor, bd: torch.Tensor | None,
                   bu: torch.Tensor | None, act: torch.Tensor, plan: AdapterPlan) -> None: ...

    def ia3(self, y: torch.Tensor, vec: torch.Tensor, plan: AdapterPlan) -> None: ...

    def col_scale(self, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                  plan: AdapterPlan) -> None: ...
