"""Issue 23 phase 2 through the engine: rows carrying a compiled constraint on real steps of the tiny
model (random weights: only the mask can make its output valid). Their output validates; their
unconstrained batch mates are bit-identical to a run without them (greedy and seeded); a preemption
(paged KV recompute) keeps the matcher consistent; a constraint that cannot go on, or whose matcher
raises, fails only its own row; a constrained row that reaches its end finishes with STOP."""
from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from server.engine import constraints as C
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import InvalidArgument

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", "emu"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "kind", "n"], "additionalProperties": False}
PROMPTS = [[1, 40, 41, 42], [1, 90, 7], [1, 5, 6, 7, 8, 9], [1, 200, 201], [1, 33], [1, 64, 65, 66, 67]]


class Run:
    def __init__(self, prompt: list[int], compiled: C.Compiled | None = None, **params):
        self.seq = Sequence("r", list(prompt), SamplingParams(**{"max_new_tokens": 40, **params}), self,
                            constraint=compiled)
        self.tokens, self.text, self.final, self.done = [], "", None, threading.Event()

    def __call__(self, ev):
        self.tokens.extend(ev.token_ids)
        self.text += ev.text
        if isinstance(ev, FinishEvent):
            self.final = ev
            self.done.set()


@pytest.fixture(scope="module")
def info(tiny_loaded) -> C.TokenizerInfo:
    return C.TokenizerInfo(tiny_loaded.tokenizer, tiny_loaded.model.shape.vocab_size, tiny_loaded.eos_ids)


@pytest.fixture(scope="module")
def compiler(info):
    c = C.ConstraintCompiler(info, C.Limits())
    yield c
    c.close()


@pytest.fixture(scope="module")
def schema(compiler) -> C.Compiled:
    return compiler.compile(C.Constraint("json_schema", json.dumps(SCHEMA)), "schema")


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    e = Engine(tiny_loaded, max_batch_size=16, max_context_tokens=128, max_queued=64, max_prefill_tokens=256)
    e.start()
    yield e
    e.stop()


def run_all(engine, runs: list[Run], ok: bool = True) -> list[Run]:
    for r in runs:
        engine.submit(r.seq)
    for r in runs:
        assert r.done.wait(60), "the request never finished"
        if ok:
            assert r.final.error is None, r.final.error
    return runs


def test_constrained_rows_write_valid_json_and_finish(engine, schema):
    runs = run_all(engine, [Run(p, schema, temperature=t, seed=i) for i, p in enumerate(PROMPTS)
                            for t in (0.0, 1.0)])
    for r in runs:
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert r.final.reason in (FinishReason.STOP, FinishReason.EOS), r.final.reason
        assert r.seq.matcher.is_done()


def test_regex_constraint_ends_with_stop_when_nothing_else_may_follow(engine, compiler):
    compiled = compiler.compile(C.Constraint("regex", "(yes|no) [0-9]{2}"), "regex")
    runs = run_all(engine, [Run(p, compiled, temperature=1.0, seed=7 + i, ignore_eos=True)
                            for i, p in enumerate(PROMPTS[:3])])
    for r in runs:
        assert r.final.reason is FinishReason.STOP
        assert r.text.split(" ")[0] in ("yes", "no") and len(r.text.split(" ")[1]) == 2, r.text


@pytest.mark.parametrize("params", [dict(), dict(temperature=1.0, seed=11, top_p=0.9),
                                    dict(repetition_penalty=1.3, logit_bias=((60, 5.0),))])
def test_unconstrained_rows_are_bit_identical_beside_constrained_ones(engine, schema, params):
    alone = run_all(engine, [Run(p, ignore_eos=True, **params) for p in PROMPTS])
    mixed = [Run(p, ignore_eos=True, **params) if i % 2 == 0 else Run(p, schema, **params)
             for i, p in enumerate(PROMPTS)]
    plain_too = [Run(p, ignore_eos=True, **params) for p in PROMPTS[1::2]]
    run_all(engine, mixed + plain_too)
    for i in range(0, len(PROMPTS), 2):
        assert mixed[i].tokens == alone[i].tokens, i
    for j, r in enumerate(plain_too):
        assert r.tokens == alone[1 + 2 * j].tokens


def test_preemption_recomputes_without_feeding_the_matcher_again(tiny_loaded, schema):
    """A KV pool too small for every row at once: sequences are preempted and recomputed; the
    constrained ones still write valid JSON, with exactly their output accepted once."""
    e = Engine(tiny_loaded, max_batch_size=8, max_context_tokens=64, max_queued=64, max_prefill_tokens=64,
               kv_blocks=17, kv_block_size=4)
    e.start()
    try:
        fed = []
        runs = [Run(p, schema, temperature=1.0, seed=3 + i) for i, p in enumerate(PROMPTS)]
        for r in runs:
            real = r.seq.matcher.accept
            r.seq.matcher.accept = lambda t, real=real, r=r: (fed.append((id(r), t)), real(t))[1]
        run_all(e, runs)
        assert sum(e.scheduler.preemptions.values()) > 0, "the test must preempt"
        for r in runs:
            jsonschema.validate(json.loads(r.text), SCHEMA)
            assert [t for k, t in fed if k == id(r)] == r.seq.output_ids
    finally:
        e.stop()


def test_a_matcher_that_fails_fails_only_its_row(engine, schema, compiler):
    bad = Run(PROMPTS[0], schema)

    def broken(token):
        raise RuntimeError("the library failed")
    bad.seq.matcher.accept = broken
    refused = Run(PROMPTS[1], schema)
    refused.seq.matcher.accept = lambda token: False
    neighbours = [Run(p, ignore_eos=True) for p in PROMPTS[2:]]
    others = [Run(p, schema) for p in PROMPTS[2:4]]
    run_all(engine, [bad, refused] + neighbours + others, ok=False)
    for r in (bad, refused):
        assert r.final.reason is FinishReason.ERROR and isinstance(r.final.error, InvalidArgument), r.final
        assert "constraint" in str(r.final.error)
    for r in neighbours + others:
        assert r.final.error is None and r.final.reason is not FinishReason.ERROR
    for r in others:
        jsonschema.validate(json.loads(r.text), SCHEMA)


@pytest.mark.parametrize("forced", [False, True])
def test_deep_nesting_fails_nothing_else(engine, compiler, forced):
    """The worst accepted input on the engine thread. Optional nesting: a random model nests until
    max_new_tokens (LENGTH). Forced nesting (every array holds one more): compiles, then llguidance's
    own limit ends it at its first mask (INVALID_ARGUMENT for that row). Neighbours are unaffected."""
    items = {"$ref": "#/$defs/n"} if forced else {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/n"}]}
    deep = {"$defs": {"n": {"type": "array", "items": items, "minItems": 1}},
            "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"]}
    compiled = compiler.compile(C.Constraint("json_schema", json.dumps(deep)), "schema")
    nested = [Run(p, compiled, max_new_tokens=120, temperature=1.0, seed=5) for p in PROMPTS[:2]]
    plain = [Run(p, ignore_eos=True) for p in PROMPTS[2:]]
    alone = run_all(engine, [Run(p, ignore_eos=True) for p in PROMPTS[2:]])
    run_all(engine, nested + plain, ok=False)
    for r in nested:
        if forced:
            assert r.final.reason is FinishReason.ERROR and isinstance(r.final.error, InvalidArgument)
        else:
            assert r.final.error is None and r.text.startswith('{"a": ['), r.text
    assert [r.tokens for r in plain] == [r.tokens for r in alone]
    assert all(r.final.error is None for r in plain)


def test_logprobs_of_a_constrained_row_are_the_raw_model_distribution(engine, schema):
    """Documented choice (server/engine/sampling.py): logprobs are log_softmax of the raw logits,
    so a constrained row's reported top tokens may be ones the constraint forbade."""
    r = Run(PROMPTS[0], schema, logprobs=3)
    r.seq.logits_trace = []
    run_all(engine, [r])
    first = r.seq.output_logprobs[0]
    raw = r.seq.logits_trace[0].log_softmax(-1)
    assert abs(first.logprob - float(raw[first.token])) < 1e-5
    assert [t for t, _ in first.top] == raw.topk(3).indices.tolist()

