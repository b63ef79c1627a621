"""Issue 20: one request never hurts another inside the engine. Extreme sampling values are safe;
a fault while running, sampling or emitting one row fails that row only (its batch mates finish
with exactly their solo tokens); a bug outside the rows restarts the loop, failing only what was
admitted, with UNAVAILABLE."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from server.engine import engine as engine_mod
from server.engine.engine import MAX_RESTARTS, Engine
from server.engine.sampling import NON_FINITE, RowState, SamplingParams, sample
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import FailedPrecondition, Unavailable

POISON = 77          # a token id the tests' faults key on


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, FinishEvent):
            self.done.set()

    @property
    def finish(self) -> FinishEvent:
        assert self.done.wait(30), "the request never finished"
        return self.events[-1]

    @property
    def ids(self) -> list[int]:
        return [t for ev in self.events for t in ev.token_ids]


@pytest.fixture()
def engine(tiny_loaded):
    e = Engine(tiny_loaded, max_batch_size=8, max_context_tokens=128, max_queued=32, max_prefill_tokens=64)
    health: list[bool] = []
    e.on_health.append(health.append)
    e.health = health
    e.start()
    yield e
    e.stop()


def run(engine, prompt, **params) -> Collector:
    c = Collector()
    engine.submit(Sequence(f"r{time.monotonic_ns()}", prompt, SamplingParams(max_new_tokens=params.pop("n", 6),
                                                                               **params), c))
    return c


def solo(engine, prompt, **params) -> list[int]:
    c = run(engine, prompt, **params)
    assert c.finish.error is None, c.finish.error
    return c.ids


CANARY = [1, 40, 41, 42]


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("params", [dict(temperature=1e-38), dict(temperature=1e-30, top_p=1e-38),
                                    dict(temperature=5e-324), dict(temperature=1e-45, min_p=1e-38),
                                    dict(temperature=1e-38, top_k=1), dict(repetition_penalty=1e-38),
                                    dict(temperature=0.7, repetition_penalty=1e-38, seed=3),
                                    dict(temperature=100.0, top_p=1.0, top_k=100_000, seed=1)])
def test_extreme_sampling_values_sample_a_token(params):
    logits = torch.randn(3, 50) * 30
    rows = [RowState(SamplingParams(max_new_tokens=4, **params), [1, 2, 3],
                     torch.Generator().manual_seed(5)) for _ in range(3)]
    out = sample(logits.clone(), rows)
    assert all(isinstance(t, int) and 0 <= t < 50 for t in out)
    if params.get("temperature", 0) < 1e-20 and "repetition_penalty" not in params:
        assert out == logits.argmax(-1).tolist()     # a vanishing temperature is greedy


def test_non_finite_logits_fail_that_row_only():
    logits = torch.randn(4, 30)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    rows = [RowState(SamplingParams(max_new_tokens=4, temperature=t, seed=1), [1], torch.Generator().manual_seed(1))
            for t in (0.0, 0.0, 1.0, 1.0)]
    out = sample(logits.clone(), rows)
    assert out[1] is NON_FINITE and out[2] is NON_FINITE
    assert out[0] == int(logits[0].argmax()) and isinstance(out[3], int)


def test_tiny_temperature_in_a_batch_never_hurts_the_canary(engine):
    """Finding 1 (engine side): temperature 1e-38 used to overflow to inf, raise in the sampler and
    kill the engine thread for every tenant."""
    want = solo(engine, CANARY)
    canary = run(engine, CANARY)
    hostile = [run(engine, [1, 5, 6 + i], temperature=1e-38) for i in range(3)]
    hostile.append(run(engine, [1, 9], temperature=1e-30, repetition_penalty=1e-38))
    assert canary.finish.error is None and canary.ids == want
    for h in hostile:
        assert h.finish.error is None and len(h.ids) >= 1
    assert engine.alive and engine.restarts == 0


# ---------------------------------------------------------------- faults in one row

def test_forward_fault_of_one_row_fails_only_that_row(engine, monkeypatch):
    want = solo(engine, CANARY)
    real = engine.model.forward

    def poisoned(batch, *a, **kw):
        if bool((batch.input_ids == POISON).any()):
            raise RuntimeError("a kernel fault triggered by one row")
        return real(batch, *a, **kw)

    monkeypatch.setattr(engine.model, "forward", poisoned)
    mates = [run(engine, CANARY) for _ in range(3)]
    bad = run(engine, [1, POISON, 3])
    assert bad.finish.reason == FinishReason.ERROR and "internal error" in str(bad.finish.error)
    for m in mates:
        assert m.finish.error is None and m.ids == want
    assert engine.alive and engine.restarts == 0


def test_sampling_fault_of_one_row_fails_only_that_row(engine, monkeypatch):
    want = solo(engine, CANARY, temperature=0.8, seed=11)
    real = engine_mod.sample

    def poisoned(logits, rows, *mask):
        if any(r.params.top_k == 13 for r in rows):
            raise RuntimeError("the sampler failed on one row")
        return real(logits, rows, *mask)

    monkeypatch.setattr(engine_mod, "sample", poisoned)
    mates = [run(engine, CANARY, temperature=0.8, seed=11) for _ in range(3)]
    bad = run(engine, [1, 8, 9], temperature=0.5, top_k=13)
    assert bad.finish.reason == FinishReason.ERROR
    for m in mates:
        assert m.finish.error is None and m.ids == want      # seeded draws unchanged by the fault
    assert engine.alive and engine.restarts == 0


def test_non_finite_logits_fail_that_row_and_mates_go_on(engine, monkeypatch):
    want = solo(engine, CANARY)
    real = engine_mod.sample

    def overflowing(logits, rows, *mask):
        for i, r in enumerate(rows):
            if r.params.top_k == 13:
                logits[i, 5] = float("inf")      # what an overflowing adapter does to its row
        return real(logits, rows, *mask)

    monkeypatch.setattr(engine_mod, "sample", overflowing)
    mates = [run(engine, CANARY) for _ in range(3)]
    bad = run(engine, [1, 8, 9], temperature=0.5, top_k=13)
    assert bad.finish.reason == FinishReason.ERROR and "non-finite" in str(bad.finish.error)
    for m in mates:
        assert m.finish.error is None and m.ids == want
    assert engine.alive and engine.restarts == 0


def test_emit_fault_of_one_row_fails_only_that_row(engine, monkeypatch):
    want = solo(engine, CANARY)
    real = Sequence.append_token

    def poisoned(self, token, *a, **kw):
        if self.request_id == "bad":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer fault")
        return real(self, token, *a, **kw)

    monkeypatch.setattr(Sequence, "append_token", poisoned)
    mates = [run(engine, CANARY) for _ in range(2)]
    bad = Collector()
    engine.submit(Sequence("bad", [1, 3, 4], SamplingParams(max_new_tokens=4), bad))
    assert bad.finish.reason == FinishReason.ERROR
    for m in mates:
        assert m.finish.error is None and m.ids == want
    assert engine.alive and engine.restarts == 0


# ---------------------------------------------------------------- the supervisor

def test_a_bug_outside_the_rows_restarts_the_loop(engine, monkeypatch):
    """The scheduler raises once: what was admitted fails with UNAVAILABLE (retry), health goes
    NOT_SERVING then SERVING, the KV cache starts empty, and the next request is served."""
    want = solo(engine, CANARY)
    sched = engine.scheduler
    real = sched.schedule
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a bug in the scheduler")
        return real()

    monkeypatch.setattr(sched, "schedule", flaky)
    victim = run(engine, CANARY, n=20)
    fin = victim.finish
    assert fin.reason == FinishReason.ERROR and isinstance(fin.error, Unavailable), fin.error
    deadline = time.monotonic() + 10
    while engine.health != [False, True] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.health == [False, True]
    assert engine.restarts == 1 and engine.alive
    assert engine.scheduler is not sched
    assert solo(engine, CANARY) == want
    assert engine.kv.blocks.num_used == 0


def test_a_bug_that_recurs_leaves_the_engine_down(tiny_loaded, monkeypatch):
    e = Engine(tiny_loaded, max_batch_size=2, max_context_tokens=64, max_queued=8, max_prefill_tokens=32)
    monkeypatch.setattr(engine_mod.Scheduler, "schedule", lambda self: (_ for _ in ()).throw(RuntimeError("always")))
    health: list[bool] = []
    e.on_health.append(health.append)
    e.start()
    try:
        c = Collector()
        e.submit(Sequence("x", [1, 2], SamplingParams(max_new_tokens=2), c))
        assert c.finish.reason == FinishReason.ERROR
        deadline = time.monotonic() + 20
        while e.alive and time.monotonic() < deadline:
            e.submit(Sequence("y", [1, 2], SamplingParams(max_new_tokens=2), Collector()))
            time.sleep(0.05)
        assert not e.alive and e.crashed is not None
        assert e.restarts == MAX_RESTARTS and health[-1] is False
    finally:
        e.stop()


# ---------------------------------------------------------------- the queue is shared (finding 9)

def test_one_tenant_cannot_fill_the_queue(tiny_loaded):
    """A tenant whose own quota is above the queue's size still leaves room for others: at most
    3/4 of the places, and in the last quarter only tenants holding few requests may add more."""
    from server.errors import ResourceExhausted
    e = Engine(tiny_loaded, max_batch_size=1, max_context_tokens=64, max_queued=32, max_prefill_tokens=32)
    # not started: nothing is admitted, the queue only fills
    def put(tenant: str) -> bool:
        try:
            e.submit(Sequence("q", [1, 2], SamplingParams(max_new_tokens=1), Collector(), tenant=tenant))
            return True
        except ResourceExhausted:
            return False

    assert sum(put("flood") for _ in range(100)) == 24
    assert [put("b") for _ in range(3)] == [True, True, False]      # a sixteenth of 32 in the last quarter
    assert put("c") and put("c") and not put("c")
    assert put("d") and put("d") and put("e") and put("e")
    assert not put("f") and not put("flood")                           # 32 taken: full for everyone
    assert e.queued() == 32
