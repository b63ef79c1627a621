"""PEFT's LoRA variants, reduced to what the LoRA slots serve: AdaLoRA and VeRA fold to LoRA factors
at load, DoRA adds one column scale per target computed once from the frozen base weight.

Exactly as peft 0.21's forward passes compute them (no dropout at inference):

AdaLoRA   y = x W^T + (x (A * E)^T B^T) * alpha / (ranknum + 1e-5)
          A [r, d_in], E [r, 1], B [d_out, r]; ranknum is init_r (PEFT keeps it when a finished run's
          `rank_pattern` prunes a module to r = sum(mask) rows; r may be 0: no delta). With
          lora_alpha <= 0 PEFT scales by r instead of alpha.
          Folded: A' = A * E, B' = B, scale = alpha / (init_r + 1e-5).
VeRA      y = x W^T + lambda_b * ((lambda_d * (x A_s^T)) B_s^T),  A_s = vera_A[:, :d_in],
          B_s = vera_B[:d_out, :] (the shared projections, sliced per module).
          Folded: A' = lambda_d[:, None] * A_s, B' = lambda_b[:, None] * B_s, scale = 1.
DoRA      y = g * (x W^T + s x A^T B^T) + b0,  g = m / ||W + s B A||_row (norm detached),
          where b0 is the base layer's own bias (PEFT subtracts it before scaling and adds it back).
LoRA bias y = x W^T + b0 + s (x A^T B^T + b_lora)   (no folding: a per-slot output shift).

Functions here trust their input: `validate` has checked names, shapes, ranks and masks.
"""
from __future__ import annotations

import torch

from server.adapters.weights import AdapterKind, LoraTarget
from server.errors import FailedPrecondition
from server.model.shape import BaseModelShape, module_path

ADALORA_EPS = 1e-5  # PEFT adds it to ranknum in AdaLoRA's forward
DORA_MIN_NORM = 1e-4  # ||W + sBA||_row below this fraction of ||W_row|| + ||sBA_row||: refused

Parts = dict[str, torch.Tensor]  # part name ("A", "E", "lambda_b", ...) -> tensor


def adalora_mask_key(layer: int, module: str) -> str:
    """The rank_pattern key PEFT writes for a module (adapter name stripped)."""
    return f"{module_path(layer, module)}.lora_E"


def adalora_rank(cfg: dict, layer: int, module: str) -> int:
    """The module's kept rank: sum of its rank_pattern mask, or init_r without one."""
    mask = (cfg.get("rank_pattern") or {}).get(adalora_mask_key(layer, module))
    return int(cfg["init_r"]) if mask is None else sum(bool(b) for b in mask)


def adalora_scale(cfg: dict, r: int) -> float:
    """PEFT's `scaling / ranknum` for a module of kept rank r."""
    alpha = 8 if cfg.get("lora_alpha") is None else cfg["lora_alpha"]
    return (alpha if alpha > 0 else r) / (int(cfg["init_r"]) + ADALORA_EPS)


def fold_to_lora(kind: AdapterKind, cfg: dict, groups: dict[tuple[int, str], Parts], shared: Parts,
                 base: BaseModelShape) -> dict[tuple[int, str], LoraTarget]:
    """AdaLoRA or VeRA module tensors -> LoRA targets; AdaLoRA modules pruned to rank 0 are dropped."""
    out: dict[tuple[int, str], LoraTarget] = {}
    for (layer, module), parts in groups.items():
        if kind is AdapterKind.ADALORA:
            r = parts["A"].shape[0]
            if r == 0:
                continue  # PEFT's forward adds exact zeros
            out[(layer, module)] = LoraTarget(A=(parts["A"] * parts["E"]).contiguous(), B=parts["B"],
                                              scale=adalora_scale(cfg, r))
        elif kind is AdapterKind.VERA:
            d_in, d_out = base.linear_dims(module)
            lambda_d, lambda_b = parts["lambda_d"], parts["lambda_b"]    # [r], [d_out]
            A_s, B_s = shared["A"][:, :d_in], shared["B"][:d_out, :]    # [r, d_in], [d_out, r]
            out[(layer, module)] = LoraTarget(A=(lambda_d[:, None] * A_s).contiguous(),
                                              B=(lambda_b[:, None] * B_s).contiguous(), scale=1.0)
        else:
            raise ValueError(f"fold_to_lora: {kind.value} is not folded")
    return out


def dora_scale(W: torch.Tensor, t: LoraTarget, what: str, max_gain: float = float("inf")) -> torch.Tensor:
    """g = m / ||W + s B A||_row  [d_out], in float32. W [d_out, d_in] is the frozen base weight (any
    dtype and device; the result is on W's device). FailedPrecondition where the norm vanishes (the
    adapter cancels a row of the base weight and PEFT itself would divide by zero) or where |g|
    passes `max_gain` (the output would be scaled past what the served dtype holds)."""
    dev = W.device
    W = W.float()
    delta = t.scale * (t.B.to(dev) @ t.A.to(dev))                     # [d_out, d_in]
    norm = torch.linalg.norm(W + delta, dim=1)                        # [d_out]
    size = torch.linalg.norm(W, dim=1) + torch.linalg.norm(delta, dim=1)
    bad = ~(norm > DORA_MIN_NORM * size)
    if bool(bad.any()):
        raise FailedPrecondition(
            f"DoRA {what}: ||W + scale * B @ A|| vanishes in {int(bad.sum())} output rows (first: "
            f"{int(bad.nonzero()[0])}), so magnitude / norm would divide by zero; this adapter does "
            f"not fit the served base model")
    g = t.magnitude.to(dev) / norm
    if not bool(torch.isfinite(g).all()):
        raise FailedPrecondition(f"DoRA {what}: magnitude / norm is not finite")
    biggest = float(g.abs().max())
    if biggest > max_gain:
        raise FailedPrecondition(f"DoRA {what}: magnitude / ||W + scale * B @ A|| reaches {biggest:.3g}; this "
                                 f"server accepts column scales up to {max_gain:.3g}")
    return g
