"""Issue 23 through the engine: penalties, logit_bias, min_p, min_tokens and logprobs on real
steps of the tiny model. Each row's raw logits are recorded (`logits_trace`) and the reference is
recomputed from them (HF's repetition penalty, OpenAI's presence/frequency formula); rows without
the new parameters are bit-identical beside rows with them."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishEvent, FinishReason, Sequence

PROMPTS = [[1, 40, 41, 42], [1, 90, 7], [1, 5, 6, 7, 8, 9], [1, 200, 201], [1, 33], [1, 64, 65, 66, 67]]


class Run:
    def __init__(self, prompt: list[int], **params):
        self.seq = Sequence("r", list(prompt), SamplingParams(**{"max_new_tokens": 12, **params}), self)
        self.seq.logits_trace = []
        self.tokens, self.logprobs, self.final, self.done = [], [], None, threading.Event()

    def __call__(self, ev):
        self.tokens.extend(ev.token_ids)
        self.logprobs.extend(ev.logprobs)
        if isinstance(ev, FinishEvent):
            self.final = ev
            self.done.set()


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    e = Engine(tiny_loaded, max_batch_size=16, max_context_tokens=128, max_queued=64, max_prefill_tokens=256)
    e.start()
    yield e
    e.stop()


def run_all(engine, runs: list[Run]) -> list[Run]:
    for r in runs:
        engine.submit(r.seq)
    for r in runs:
        assert r.done.wait(60), "the request never finished"
        assert r.final.error is None, r.final.error
    return runs


def reference_greedy_step(raw: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> int:
    """The next greedy token from one step's raw logits [vocab], with the references of each edit."""
    x = raw.clone()
    for t, b in p.logit_bias:
        x[t] += b
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), x[None])[0]
    for j in set(output):       # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence
        x[j] -= output.count(j) * p.frequency_penalty + p.presence_penalty
    return int(x.argmax())


@pytest.mark.parametrize("params", [
    dict(presence_penalty=2.0),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=-1.0, frequency_penalty=0.7, repetition_penalty=1.3),
    dict(logit_bias=((60, 4.0), (61, -100.0), (62, 2.5)), frequency_penalty=2.0),
])
def test_greedy_with_penalties_and_bias_follows_the_reference_at_every_step(engine, params):
    prompt = PROMPTS[0]
    run = run_all(engine, [Run(prompt, ignore_eos=True, max_new_tokens=48, **params)])[0]
    plain = run_all(engine, [Run(prompt, ignore_eos=True, max_new_tokens=48)])[0]
    assert len(run.seq.logits_trace) == len(run.tokens) == 48
    for step, raw in enumerate(run.seq.logits_trace):
        assert run.tokens[step] == reference_greedy_step(raw, prompt, run.tokens[:step], run.seq.params), step
    assert run.tokens != plain.tokens, "the penalties must change this greedy run"


def test_min_tokens_holds_back_a_forced_end_of_sequence(engine, tiny_loaded):
    (eos,) = tiny_loaded.eos_ids
    forced = dict(logit_bias=((eos, 100.0),))
    now, later = run_all(engine, [Run(PROMPTS[1], **forced), Run(PROMPTS[1], min_tokens=5, **forced)])
    assert now.tokens == [eos] and now.final.reason == FinishReason.EOS
    assert len(later.tokens) == 6 and later.tokens[-1] == eos and eos not in later.tokens[:5]
    assert later.final.reason == FinishReason.EOS and later.final.completion_tokens == 6


def test_logit_bias_bans_the_greedy_token(engine):
    plain = run_all(engine, [Run(PROMPTS[2], max_new_tokens=1)])[0]
    banned = run_all(engine, [Run(PROMPTS[2], max_new_tokens=1, logit_bias=((plain.tokens[0], -100.0),))])[0]
    assert banned.tokens != plain.tokens
    raw = banned.seq.logits_trace[0].clone()
    raw[plain.tokens[0]] -= 100
    assert banned.tokens == [int(raw.argmax())]


def test_seeded_sampling_with_logprobs_is_reproducible_and_logprobs_are_raw(engine):
    kw = dict(temperature=1.1, seed=42, top_k=50, min_p=0.02, presence_penalty=0.5, logprobs=4, ignore_eos=True)
    a, b = run_all(engine, [Run(PROMPTS[3], **kw), Run(PROMPTS[3], **kw)])
    assert a.tokens == b.tokens and [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]
    for raw, tok, lp in zip(a.seq.logits_trace, a.tokens, a.logprobs):
        ref = raw.log_softmax(-1)
        assert lp.token == tok and lp.logprob == pytest.approx(ref[tok].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == ref.topk(4).indices.tolist()


def test_rows_without_the_new_parameters_are_bit_identical_in_a_mixed_batch(engine, tiny_loaded):
    """Plain rows beside rows using every new parameter get exactly the tokens they get alone, and
    bit for bit the logits they get beside plain rows in the same places (the same batch shapes, so
    the same forward numerics: only the sampler could make a difference)."""
    (eos,) = tiny_loaded.eos_ids
    plain_params = [dict(), dict(temperature=0.8, seed=3), dict(repetition_penalty=1.2),
                    dict(temperature=1.0, seed=9, top_p=0.9)]
    busy_params = [dict(logprobs=20, presence_penalty=2.0, frequency_penalty=-2.0),
                   dict(temperature=1e-38, min_p=1.0, logit_bias=tuple((i, -100.0) for i in range(3, 250, 2))),
                   dict(min_tokens=12, logit_bias=((eos, 100.0),), logprobs=0),
                   dict(temperature=2.0, seed=1, min_p=0.3, frequency_penalty=2.0, logprobs=1)]
    solo = [run_all(engine, [Run(p, ignore_eos=True, **kw)])[0] for p, kw in zip(PROMPTS, plain_params)]

    def batch(mates: list[dict]) -> list[Run]:
        """All rows in every step: queued before a fresh engine starts."""
        rows = [Run(p, ignore_eos=True, **kw) for p, kw in zip(PROMPTS, plain_params)]
        others = [Run(p, ignore_eos=True, **kw) for p, kw in zip(PROMPTS[1:] + PROMPTS[:1], mates)]
        e = Engine(tiny_loaded, max_batch_size=16, max_context_tokens=128, max_queued=64, max_prefill_tokens=256)
        for r in [r for pair in zip(rows, others) for r in pair]:
            e.submit(r.seq)
        e.start()
        try:
            for r in rows + others:
                assert r.done.wait(60) and r.final.error is None
        finally:
            e.stop()
        assert all(len(o.tokens) == 12 for o in others)
        return rows

    beside_busy, beside_plain = batch(busy_params), batch([{}] * len(busy_params))
    for s, m, c in zip(solo, beside_busy, beside_plain):
        assert m.tokens == s.tokens == c.tokens and m.logprobs == [] == s.logprobs
        assert all(torch.equal(a, b) for a, b in zip(m.seq.logits_trace, c.seq.logits_trace))
