"""Batched sampling with per-row parameters.

Temperature 0 is greedy. Every sampled row draws from its own `torch.Generator`, seeded per
request, so a seeded request gives the same tokens whatever else shares its batch.

Safe for every accepted parameter: logits are shifted so the largest is 0 before the division by
the temperature (a temperature of 1e-38 turns every other logit into -inf, which is greedy, never
inf - inf); a repetition penalty's quotient is clamped to the finite range. A row whose logits are
not finite (an adapter that overflows) gets `NonFinite` instead of a token: the engine fails that
row alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0              # 1 = off
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # None = the server picks one
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # 1 = off
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RowState:
    params: SamplingParams
    seen_ids: list[int]                 # prompt + output so far (for the repetition penalty)
    generator: torch.Generator | None   # set for sampled rows


class NonFinite:
    """Stands in for a row's token when its logits hold NaN or Inf."""

    def __repr__(self) -> str:
        return "NonFinite"


NON_FINITE = NonFinite()


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    """In place on one row's logits [vocab], as HF's RepetitionPenaltyLogitsProcessor does
    (a tiny penalty's quotient clamped to the dtype's finite range)."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    vals = logits[idx]
    big = torch.finfo(logits.dtype).max
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty).clamp(-big, big)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus filtering drop; logits [vocab] already scaled."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[RowState]) -> list[int | NonFinite]:
    """logits [R, vocab] (any float dtype) -> one token id per row (NON_FINITE for a row whose
    logits are not all finite)."""
    logits = logits.float()
    finite = torch.isfinite(logits).all(-1).tolist()
    for i, r in enumerate(rows):
        if finite[i] and r.params.repetition_penalty not in (0.0, 1.0):
            apply_repetition_penalty(logits[i], r.seen_ids, r.params.repetition_penalty)
    out: list[int | NonFinite] = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        if not finite[i]:
            out[i] = NON_FINITE
        elif not r.params.greedy:
            shifted = (logits[i] - logits[i].max()) / r.params.temperature    # max 0, others <= 0 or -inf
            row = filter_top_k_top_p(shifted, r.params.top_k, r.params.top_p)
            out[i] = int(torch.multinomial(row.softmax(-1).cpu(), 1, generator=r.generator))
    return out
