"""Sampling: greedy, seeded reproducibility independent of batch mates, filters, penalty."""
from __future__ import annotations

import math

import pytest
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


# ---------------------------------------------------------------- issue 23: penalties, bias, min_p, min_tokens, logprobs
from server.engine.sampling import (MIN_LOGPROB, NON_FINITE, apply_presence_frequency, raw_logprobs,  # noqa: E402
                                    sample_with_logprobs, token_logprobs)


def state(output=(), end=frozenset(), prompt=(1, 2, 3), **kw) -> RowState:
    p = SamplingParams(max_new_tokens=64, **kw)
    g = None if p.greedy else torch.Generator().manual_seed(p.seed or 0)
    return RowState(p, list(prompt) + list(output), g, list(output), end)


def openai_penalties(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula, one token at a time:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for j in range(out.shape[-1]):
        c = output.count(j)
        out[j] = out[j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize("presence, frequency", [(0.7, 0.0), (0.0, 1.3), (2.0, -2.0), (-1.5, 0.4)])
def test_presence_frequency_penalties_match_openais_formula(presence, frequency):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, generator=g) * 4
    output = [3, 5, 5, 7, 7, 7, 39]
    ours = logits.clone()
    apply_presence_frequency(ours, output, presence, frequency)
    assert torch.allclose(ours, openai_penalties(logits, output, presence, frequency), atol=1e-6)
    assert not torch.equal(ours, logits)
    # through sample(): the prompt's tokens are not penalized, only the output's
    want = openai_penalties(logits, output, presence, frequency).argmax().item()
    assert sample(logits[None].clone(), [state(output, presence_penalty=presence, frequency_penalty=frequency)]) == [want]


def test_repetition_penalty_with_presence_frequency_applies_both_in_order():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(1, 30)
    prompt, output = [1, 2, 9], [9, 4, 4]
    ref = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([prompt + output]), logits.clone())[0]
    ref = openai_penalties(ref, output, 0.5, 0.25)
    r = state(output, prompt=prompt, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.25)
    assert sample(logits.clone(), [r]) == [int(ref.argmax())]


def test_logit_bias_bans_and_forces_tokens():
    logits = torch.randn(6, 50) * 3
    top = logits.argmax(-1).tolist()
    banned = sample(logits.clone(), [state(logit_bias=((t, -100.0),)) for t in top])
    assert all(b != t for b, t in zip(banned, top))
    forced = sample(logits.clone(), [state(logit_bias=((17, 100.0),)) for _ in range(6)])
    assert forced == [17] * 6
    # sampled at temperature 1, +100 makes every other token vanishingly unlikely
    for seed in range(20):
        assert sample(logits[:1].clone(), [state(temperature=1.0, seed=seed, logit_bias=((23, 100.0),))]) == [23]
    # a small bias shifts exactly that logit
    row = logits[0].clone()
    sample(row[None], [state(logit_bias=((4, 2.5), (9, -1.0)))])
    want = logits[0].clone()
    want[4] += 2.5
    want[9] -= 1.0
    assert torch.allclose(row, want)


@settings(max_examples=40, deadline=None)
@given(min_p=st.floats(1e-6, 1.0), seed=st.integers(0, 1000), t=st.sampled_from([0.3, 1.0, 2.0]))
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one(min_p, seed, t):
    from transformers.generation.logits_process import MinPLogitsWarper
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(80, generator=g) * 3
    probs = (logits / t).softmax(-1)
    allowed = probs >= min_p * probs.max()
    hf = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), (logits / t)[None].clone())[0]
    assert torch.equal(torch.isfinite(hf), allowed) or (allowed ^ torch.isfinite(hf)).sum() <= 1   # the edge
    for s in range(10):
        tok = sample(logits[None].clone(), [state(temperature=t, seed=seed * 100 + s, min_p=min_p)])[0]
        assert allowed[tok]


def test_min_p_one_keeps_only_the_top_token():
    logits = torch.randn(3, 60)
    rows = [state(temperature=1.5, seed=s, min_p=1.0) for s in range(3)]
    assert sample(logits.clone(), rows) == logits.argmax(-1).tolist()


def test_min_tokens_masks_the_end_tokens_until_reached():
    logits = torch.randn(1, 30)
    logits[0, 2] = 50.0                       # EOS would win
    logits[0, 7] = 49.0                       # ... then the end-of-turn token
    end = frozenset({2, 7})
    assert sample(logits.clone(), [state(output=[5, 6], end=end, min_tokens=3)]) != [2]
    assert sample(logits.clone(), [state(output=[5, 6], end=end, min_tokens=3)]) != [7]
    # end_ids empty (the sequence reached min_tokens: it passes none): EOS wins again
    assert sample(logits.clone(), [state(output=[5, 6, 8], min_tokens=3)]) == [2]
    # sampled: never an end token while masked, even with a +100 bias on it
    for seed in range(20):
        r = state(output=[], end=end, min_tokens=3, temperature=1.0, seed=seed, logit_bias=((2, 100.0),))
        assert sample(logits.clone(), [r])[0] not in end


def test_sequence_masks_the_end_tokens_and_ignores_stop_strings_before_min_tokens(tiny_loaded):
    from server.engine.sequence import FinishEvent, Sequence
    tok, eos = tiny_loaded.tokenizer, tiny_loaded.eos_ids
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=8, min_tokens=3, stop=("a",)), lambda ev: None,
                   stop_ids=frozenset({7}))
    assert seq.row_state(eos).end_ids == eos | {7}
    a = tok.token_to_id("a")
    assert not isinstance(seq.append_token(a, tok, eos), FinishEvent)      # "a" before min_tokens: kept
    seq.append_token(a, tok, eos)
    assert seq.row_state(eos).end_ids == eos | {7}
    ev = seq.append_token(a, tok, eos)                                     # the third token: stops now
    assert isinstance(ev, FinishEvent) and ev.reason.value == "stop" and seq.row_state(eos).end_ids == frozenset()


def test_logprobs_are_the_raw_log_softmax_whatever_the_sampling():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 70, generator=g) * 2
    ref = logits.log_softmax(-1)
    rows = [state(logprobs=5),                                               # greedy
            state(logprobs=3, temperature=0.5, seed=1, top_k=4, min_p=0.1),
            state(logprobs=0, temperature=1.7, seed=2, presence_penalty=2.0, frequency_penalty=2.0,
                  output=[1, 1, 2], logit_bias=((9, 100.0),), repetition_penalty=3.0),
            state(temperature=1.0, seed=3)]                                  # no logprobs
    drawn = sample_with_logprobs(logits.clone(), rows)
    for i, (tok, lp) in enumerate(drawn[:3]):
        assert lp.token == tok and lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-6)
        k = rows[i].params.logprobs
        assert [t for t, _ in lp.top] == ref[i].topk(k).indices.tolist() if k else lp.top == ()
        assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-6) if k else True
    assert drawn[0][0] == lp_top0(drawn[0][1])                                # greedy: the top token
    assert drawn[2][0] == 9                                                  # the bias forced it; logprob is raw
    assert drawn[3][1] is None


def lp_top0(lp) -> int:
    return lp.top[0][0]


def test_logprobs_of_extreme_logits_stay_finite():
    logits = torch.tensor([[3e38, -3e38, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    rows = [state(logprobs=4), state(logprobs=4)]
    for tok, lp in sample_with_logprobs(logits.clone(), rows):
        assert all(math.isfinite(v) and v >= MIN_LOGPROB for _, v in lp.top) and math.isfinite(lp.logprob)


def test_non_finite_rows_get_no_logprobs():
    logits = torch.randn(2, 20)
    logits[1, 3] = float("nan")
    rows = [state(logprobs=2), state(logprobs=2)]
    raw = raw_logprobs(logits, rows)
    tokens = sample(logits.clone(), rows)
    found = token_logprobs(raw, tokens, rows)
    assert tokens[1] is NON_FINITE and found[1] is None and found[0].token == tokens[0]


def test_rows_without_the_new_parameters_are_bit_identical_beside_rows_with_them():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 90, generator=g) * 5
    plain = [state(), state(temperature=0.9, seed=4, top_p=0.8), state(repetition_penalty=1.3, output=[5])]
    busy = [state(logprobs=20, logit_bias=tuple((i, -100.0) for i in range(0, 90, 3)), presence_penalty=2.0,
                  frequency_penalty=-2.0, output=[1, 2, 2], min_tokens=5, end=frozenset({2})),
            state(temperature=1e-38, min_p=1e-38, logprobs=1, logit_bias=((3, 100.0),)),
            state(temperature=2.0, seed=9, min_p=0.5, top_k=3, presence_penalty=-2.0, output=[7] * 40)]
    alone_logits = logits[[0, 2, 4]].clone()
    alone = sample(alone_logits, [state(), state(temperature=0.9, seed=4, top_p=0.8),
                                  state(repetition_penalty=1.3, output=[5])])
    mixed_logits = logits.clone()
    mixed = sample_with_logprobs(mixed_logits, [plain[0], busy[0], plain[1], busy[1], plain[2], busy[2]])
    assert [mixed[i][0] for i in (0, 2, 4)] == alone
    assert torch.equal(mixed_logits[[0, 2, 4]], alone_logits)      # the same values went into the draw


@settings(max_examples=80, deadline=None)
@given(presence=st.floats(-2, 2), frequency=st.floats(-2, 2), min_p=st.floats(0, 1),
       temperature=st.sampled_from([0.0, 5e-324, 1e-38, 1e-30, 0.7, 2.0, 100.0]), bias=st.floats(-100, 100),
       n_bias=st.integers(0, 300), scale=st.sampled_from([1.0, 1e4, 1e30, 3e38]), seed=st.integers(0, 99),
       output=st.lists(st.integers(0, 299), max_size=60), min_tokens=st.integers(0, 64),
       repetition=st.sampled_from([1.0, 1e-38, 0.5, 10.0]))
def test_every_accepted_value_samples_a_token_and_finite_logprobs(presence, frequency, min_p, temperature, bias,
                                                                  n_bias, scale, seed, output, min_tokens, repetition):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(2, 300, generator=g) * 2 - 1) * scale
    r = state(output=output, end=frozenset({2}), temperature=temperature, seed=seed, presence_penalty=presence,
              frequency_penalty=frequency, min_p=min_p, min_tokens=min_tokens, repetition_penalty=repetition,
              logit_bias=tuple((i, bias) for i in range(n_bias)), logprobs=20)
    for tok, lp in sample_with_logprobs(logits.clone(), [r, r]):
        assert isinstance(tok, int) and 0 <= tok < 300
        assert len(output) >= min_tokens or tok != 2
        assert math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top) and len(lp.top) == 20
