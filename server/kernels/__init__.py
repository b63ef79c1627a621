"""Batched adapter kernels: apply a different adapter to every row of one batch.

    plan = make_plan(slots, slot_ranks)          # once per forward step (plan.py; plan_rows from host values)
    v = shrink(x, A, plan)                       # [T, r_max]
    expand(y, v, B, scale, plan)                 # y += scale * v @ B^T, in place
    lora(y, x, A, B, scale, plan)                # shrink + expand, in place
    lora_packed(y, x, A_packed, B_list, scales, out_slices, plan)  # q/k/v, gate/up
    bottleneck(h, D, U, bd, bu, act, plan)       # h += U act(D h + bd) + bu, in place
    ia3(y, vec, plan)                            # y *= vec[slot], in place
    col_scale(y, scale, shift, plan)             # y = scale[slot] * y + shift[slot] (DoRA), in place

Semantics: ``server.kernels.reference``; signatures: ``contract.KernelBackend``.
This module only dispatches each call to one backend module, chosen once per
device from the process-wide choice set by ``configure`` (the server's
``--kernels auto|torch|triton``): ``select_backend`` says which module serves a
device, ``backend_name`` names it for logs and GetServerInfo, ``layouts`` says
which plan layouts its ops read (a plan is built with those only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

from server.kernels import reference, torch_ops
from server.kernels.contract import OPS, KernelBackend
from server.kernels.plan import AdapterPlan, make_plan, plan_rows

__all__ = [
    "AdapterPlan", "make_plan", "plan_rows", "layouts", "shrink", "expand", "lora", "lora_packed",
    "bottleneck", "ia3", "col_scale", "reference", "backend", "select_backend", "configure",
    "backend_name", "BACKENDS", "KernelBackend",
]

BACKENDS = ("auto", "torch", "triton")
_choice = "auto"  # set once at start by configure(); read by backend()


def select_backend(device: torch.device, name: str) -> ModuleType:
    """The backend module for tensors on `device` under the choice `name`.

    "torch": torch_ops everywhere. "triton": triton_ops (CUDA, or CPU tensors
    when TRITON_INTERPRET=1 was set before triton was imported); raises if
    that cannot run here. "auto": torch_ops, also on CUDA, until a GPU run of
    `make gpu-check` has passed (TODO(#17): then triton_ops on CUDA)."""
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, not {name!r}")
    if name != "triton":
        return torch_ops
    try:
        from server.kernels import triton_ops
    except ImportError as err:
        raise RuntimeError("kernels 'triton' needs the triton package: "
                           "pip install 'lorafleet[gpu]'") from err
    if device.type != "cuda" and not triton_ops.INTERPRETED:
        raise RuntimeError(f"kernels 'triton' runs on CUDA tensors, not {device.type} "
                           "(or on CPU under TRITON_INTERPRET=1, for tests)")
    return triton_ops


def configure(name: str) -> None:
    """Set the process-wide backend choice ("auto" | "torch" | "triton")."""
    global _choice
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, not {name!r}")
    _choice = name
    backend.cache_clear()


@cache
def backend(device: torch.device) -> ModuleType:
    """The implementation module used for tensors on `device` (decided once)."""
    return select_backend(device, _choice)


def backend_name(device: torch.device) -> str:
    """"torch" or "triton": which backend serves `device` now."""
    return backend(device).NAME


def layouts(device: torch.device, *ops: str) -> frozenset[str]:
    """The plan layouts the backend serving `device` reads for these ops (see plan.py)."""
    table = backend(device).LAYOUT
    return frozenset(table[op] for op in ops)


def _dispatcher(name: str) -> Callable[..., torch.Tensor | None]:
    """op(*args): backend(first tensor's device).<name>(*args). Signature from reference."""
    sig = inspect.signature(getattr(reference, name))

    def op(*args, **kwargs):
        first = args[0] if args else next(iter(sig.bind(*args, **kwargs).arguments.values()))
        return getattr(backend(first.device), name)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"See reference.{name}."
    op.__signature__ = sig  # type: ignore[attr-defined]
    return op


shrink, expand, lora, lora_packed, bottleneck, ia3, col_scale = (_dispatcher(op) for op in OPS)
