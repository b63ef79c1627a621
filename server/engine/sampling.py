"""Batched sampling with per-row parameters.

Temperature 0 is greedy. Every sampled row draws from its own `torch.Generator`, seeded per
request, so a seeded request gives the same tokens whatever else shares its batch.

Per row, in this order, each step only where the row asks for it (a row that asks for none of them
is sampled from its logits untouched, bit-identical to a batch without such rows):
  logit_bias            logits[id] += bias (|bias| <= 100)
  repetition_penalty    HF's: positive logits of seen tokens (prompt + output) / penalty, negative * penalty
  presence / frequency  OpenAI's, on output tokens: logits[t] -= frequency * count[t] + presence * (count[t] > 0)
  min_tokens            the end tokens (EOS, end of turn) -> -inf while fewer than min_tokens are generated
  constraint mask       tokens the row's constraint forbids -> -inf (`sample`'s `mask`: the engine's
                        `constraints.apply_masks`, for the rows that carry a constraint, issue 23)
  temperature           (logits - max) / temperature (greedy rows: argmax here)
  min_p                 drop tokens whose probability is below min_p * the top one's
  top_k, top_p          as HF's filters
This is vLLM's order, except that min_tokens masks after the penalties (so no penalty can turn its
-inf back into a finite value); the constraint mask comes last of the edits for the same reason (a
repetition penalty's clamp would turn its -inf into a finite number). The finiteness check looks at
the logits before any edit, so only the model's own NaN/Inf fail a row as `NonFinite`; a row whose
mask allows nothing (or whose constraint is in error) gets `REFUSED`.

Safe for every accepted parameter: logits are shifted so the largest is 0 before the division by
the temperature (a temperature of 1e-38 turns every other logit into -inf, which is greedy, never
inf - inf), and a temperature below float32's smallest normal number (5e-324 is a valid JSON
number) is raised to it, since float32 would round it to 0 and divide 0 by 0; a repetition penalty's quotient, and logits after a bias or a presence/frequency
penalty, are clamped to the finite range; the end tokens are the only ones min_tokens masks, so a
row always keeps a finite logit. A row whose logits are not finite (an adapter that overflows) gets
`NonFinite` instead of a token: the engine fails that row alone.

Logprobs (`SamplingParams.logprobs`) are the model's own distribution: log_softmax of the raw
logits, before every step above (vLLM's default, `raw_logprobs`, and what OpenAI's logprobs
mean), so they do not depend on temperature, penalties, bias, filters or a constraint (a
constrained row's top logprobs may name tokens its constraint forbade). A logprob below -9999
is reported as -9999 (OpenAI's value for "practically never").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
    presence_penalty: float = 0.0    # 0 = off
    frequency_penalty: float = 0.0   # 0 = off
    min_p: float = 0.0               # 0 = off
    min_tokens: int = 0              # the end tokens are masked until this many are generated
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit), ids distinct
    logprobs: int | None = None      # None = off; k: the sampled token's logprob and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def edits_logits(self) -> bool:
        """Whether a step before the temperature changes this row's logits."""
        return bool(self.logit_bias or self.repetition_penalty not in (0.0, 1.0) or self.presence_penalty
                    or self.frequency_penalty or self.min_tokens)


@dataclass(frozen=True)
class RowState:
    params: SamplingParams
    seen_ids: list[int]                 # prompt + output so far (for the repetition penalty)
    generator: torch.Generator | None   # set for sampled rows
    output_ids: list[int] | tuple[int, ...] = ()   # output so far (presence/frequency penalties, min_tokens)
    end_ids: frozenset[int] = frozenset()   # masked while fewer than params.min_tokens are generated


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model, and the most likely tokens at its position."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob), most likely first


MIN_LOGPROB = -9999.0
FLOAT32_TINY = torch.finfo(torch.float32).tiny      # the least temperature divided by (1.2e-38)


class NonFinite:
    """Stands in for a row's token when its logits hold NaN or Inf."""

    def __repr__(self) -> str:
        return "NonFinite"


NON_FINITE = NonFinite()


class Refused:
    """Stands in for a row's token when its constraint mask allows no token, or its constraint is in error."""

    def __repr__(self) -> str:
        return "Refused"


REFUSED = Refused()


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


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> None:
    """In place on one row's logits [vocab]: logits[id] += value for each (id, value), clamped finite."""
    idx = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    add = torch.tensor([v for _, v in bias], dtype=logits.dtype, device=logits.device)
    big = torch.finfo(logits.dtype).max
    logits[idx] = (logits[idx] + add).clamp(-big, big)


def apply_presence_frequency(logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float) -> None:
    """In place on one row's logits [vocab], OpenAI's formula over the tokens generated so far:
    logits[t] -= frequency * count[t] + presence * (count[t] > 0), clamped to the finite range."""
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long),
                            minlength=logits.shape[-1]).to(logits.device, logits.dtype)   # [vocab]
    big = torch.finfo(logits.dtype).max
    logits.sub_(counts * frequency + (counts > 0).to(logits.dtype) * presence).clamp_(-big, big)


def edit_logits(logits: torch.Tensor, r: RowState) -> None:
    """The steps before the temperature, in place on one row's finite logits [vocab] (module docstring)."""
    p = r.params
    if p.logit_bias:
        apply_logit_bias(logits, p.logit_bias)
    if p.repetition_penalty not in (0.0, 1.0):
        apply_repetition_penalty(logits, r.seen_ids, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
        apply_presence_frequency(logits, list(r.output_ids), p.presence_penalty, p.frequency_penalty)
    if len(r.output_ids) < p.min_tokens and r.end_ids:
        logits[torch.tensor(sorted(r.end_ids), dtype=torch.long, device=logits.device)] = float("-inf")


def filter_min_p(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens less likely than min_p times the top one; `scaled` [vocab] is the
    shifted, temperature-scaled row (its largest value is 0, so p / p_max = exp(scaled))."""
    return scaled.masked_fill(scaled < math.log(min_p), float("-inf"))


def sample(logits: torch.Tensor, rows: list[RowState],
           mask: Callable[[torch.Tensor], list[int]] | None = None) -> list[int | NonFinite | Refused]:
    """logits [R, vocab] (any float dtype) -> one token id per row (NON_FINITE for a row whose
    logits are not all finite). Float32 logits are edited in place for rows that ask for it.
    `mask`, when given, is called once on the edited float32 logits [R, vocab], writes -inf in place
    where a row's constraint forbids a token (rows without one untouched) and returns the rows that
    cannot go on (REFUSED)."""
    logits = logits.float()
    finite = torch.isfinite(logits).all(-1).tolist()
    for i, r in enumerate(rows):
        if finite[i] and r.params.edits_logits:
            edit_logits(logits[i], r)
    refused = set(mask(logits)) if mask is not None else set()
    out: list[int | NonFinite | Refused] = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        if not finite[i]:
            out[i] = NON_FINITE
        elif i in refused:
            out[i] = REFUSED
        elif not r.params.greedy:
            t = max(r.params.temperature, FLOAT32_TINY)
            shifted = (logits[i] - logits[i].max()) / t    # max 0, others <= 0 or -inf
            if r.params.min_p > 0.0:
                shifted = filter_min_p(shifted, r.params.min_p)
            row = filter_top_k_top_p(shifted, r.params.top_k, r.params.top_p)
            out[i] = int(torch.multinomial(row.softmax(-1).cpu(), 1, generator=r.generator))
    return out


def raw_logprobs(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor | None:
    """log_softmax of the raw logits [R, vocab] of the rows that ask for logprobs: [W, vocab] in
    row order (a copy: take it before `sample` edits the logits), or None when no row asks."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    return logits[want].float().log_softmax(-1) if want else None


def token_logprobs(raw: torch.Tensor | None, tokens: list[int | NonFinite],
                   rows: list[RowState]) -> list[TokenLogprobs | None]:
    """Per row: its sampled token's logprob and the top params.logprobs tokens, read from `raw`
    (raw_logprobs of the same rows) with one top-k and one gather for all of them; None for rows
    that do not ask and rows without a token."""
    found: list[TokenLogprobs | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if raw is None or not want:
        return found
    picked = torch.tensor([t if isinstance(t, int) else 0 for t in (tokens[i] for i in want)], device=raw.device)
    chosen = raw.gather(1, picked[:, None])[:, 0].tolist()
    k = min(max(rows[i].params.logprobs for i in want), raw.shape[-1])
    top_v, top_i = raw.topk(k, -1) if k else (raw[:, :0], raw[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        if not isinstance(tokens[i], int):
            continue
        kj = rows[i].params.logprobs
        top = tuple((t, max(v, MIN_LOGPROB)) for t, v in zip(top_i[j][:kj], top_v[j][:kj]))
        found[i] = TokenLogprobs(tokens[i], max(chosen[j], MIN_LOGPROB), top)
    return found


def sample_with_logprobs(logits: torch.Tensor,
                         rows: list[RowState]) -> list[tuple[int | NonFinite, TokenLogprobs | None]]:
    """`sample`, with each row's `token_logprobs` (None where the row does not ask)."""
    raw = raw_logprobs(logits, rows)
    tokens = sample(logits, rows)
    return list(zip(tokens, token_logprobs(raw, tokens, rows)))
