"""Sampling: greedy, seeded reproducibility independent of batch mates, filters, penalty."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.sampling import RowState, SamplingParams, filter_top_k_top_p, sample


def row(**kw) -> RowState:
    p = SamplingParams(max_new_tokens=8, **kw)
    g = None if p.greedy else torch.Generator().manual_seed(p.seed or 0)
    return RowState(p, [1, 2, 3], g)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert sample(logits, [row() for _ in range(5)]) == logits.argmax(-1).tolist()


def test_seeded_row_independent_of_batch_mates():
    logits = torch.randn(4, 100)
    alone = sample(logits[2:3].clone(), [row(temperature=1.0, seed=7)])
    mates = [row(), row(temperature=0.5, seed=1), row(temperature=1.0, seed=7), row(temperature=2.0, seed=3)]
    together = sample(logits.clone(), mates)
    assert together[2] == alone[0]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 40), p=st.floats(0.05, 0.99), seed=st.integers(0, 1000))
def test_top_k_top_p_keep_only_allowed_tokens(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, generator=g)
    kept = filter_top_k_top_p(logits.clone(), k, p)
    allowed = torch.isfinite(kept)
    assert 1 <= int(allowed.sum()) <= k
    # every kept token is at least as likely as every dropped one
    if (~allowed).any():
        assert logits[allowed].min() >= logits[~allowed].max()
    # the kept set is the smallest prefix whose mass reaches p (within the top-k)
    probs = logits.softmax(-1)
    topk = torch.topk(logits, k).indices
    mass_without_last = probs[allowed].sum() - probs[allowed].min()
    assert mass_without_last < p + 1e-6 or int(allowed.sum()) == 1 or int(allowed.sum()) == len(topk)
    for _ in range(20):
        t = sample(logits[None].clone(), [row(temperature=1.0, top_k=k, top_p=p, seed=seed)])[0]
        assert allowed[t]


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(1, 30)
    seen = [3, 5, 5, 7]
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seen]), logits.clone())
    ours = logits.clone()
    from server.engine.sampling import apply_repetition_penalty
    apply_repetition_penalty(ours[0], seen, 1.7)
    assert torch.allclose(ours, ref)
    assert not torch.allclose(ours, logits)
