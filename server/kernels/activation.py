"""The bottleneck adapters' activations: one enum for the file format (its lowercase name), the
device slots (its integer id, stored per slot) and the kernels and trainer (its function)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:      # torch is imported where a function is used: NAMES serves torch-free CLIs too
    import torch


class Activation(enum.IntEnum):
    RELU = 0
    GELU = 1          # the exact (erf) GELU, as torch's F.gelu and PEFT compute it
    SILU = 2

    @property
    def fn(self) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        import torch.nn.functional as F
        return (F.relu, F.gelu, F.silu)[self]

    @classmethod
    def of(cls, name: str) -> "Activation":
        """From the file format's lowercase name; KeyError for any other."""
        return cls[name.upper()]


NAMES = tuple(a.name.lower() for a in Activation)


def apply_per_row(z: "torch.Tensor", ids: "torch.Tensor") -> "torch.Tensor":
    """Each row's own activation: `ids` (Activation values) broadcasts against z."""
    import torch
    out = Activation.SILU.fn(z)
    for act in (Activation.GELU, Activation.RELU):
        out = torch.where(ids == act, act.fn(z), out)
    return out
