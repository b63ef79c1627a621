"""The engine loop without gRPC: deadlines, cancellation and errors free slots at once."""
from __future__ import annotations

import threading
import time

import pytest

from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import ResourceExhausted, Unavailable


@pytest.fixture()
def engine(tiny_loaded):
    e = Engine(tiny_loaded, max_batch_size=2, max_context_tokens=128, max_queued=4, max_prefill_tokens=64)
    e.start()
    yield e
    e.stop()


class Collector:
    def __init__(self, on_token=None):
        self.events, self.done, self.on_token = [], threading.Event(), on_token

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, FinishEvent):
            self.done.set()
        elif self.on_token:
            self.on_token()

    @property
    def finish(self) -> FinishEvent:
        assert self.done.wait(30)
        return self.events[-1]


def wait_idle(engine):
    t = time.monotonic() + 10
    while engine.scheduler.has_work() and time.monotonic() < t:
        time.sleep(0.005)
    return engine.kv.blocks.num_used == 0


def test_deadline_mid_generation_finishes_cancelled_and_frees_slot(engine):
    holder = {}
    sink = Collector(on_token=lambda: setattr(holder["seq"], "deadline", 0.0))
    seq = Sequence("a", [1, 50, 60], SamplingParams(max_new_tokens=100), sink)
    holder["seq"] = seq
    engine.submit(seq)
    fin = sink.finish
    assert fin.reason == FinishReason.CANCELLED
    assert fin.completion_tokens < 100
    assert wait_idle(engine)


def test_cancel_while_queued_and_while_running(engine):
    s1 = Collector()
    running = Sequence("a", [1, 50], SamplingParams(max_new_tokens=100), s1)
    s1.on_token = running.cancel
    engine.submit(running)
    assert s1.finish.reason == FinishReason.CANCELLED
    s2 = Collector()
    queued = Sequence("b", [1, 50], SamplingParams(max_new_tokens=5), s2, deadline=0.0)
    engine.submit(queued)
    assert s2.finish.reason == FinishReason.CANCELLED and s2.finish.completion_tokens == 0
    assert wait_idle(engine)


def test_queue_bound_and_stopped_engine(tiny_loaded):
    e = Engine(tiny_loaded, max_batch_size=1, max_context_tokens=64, max_queued=2, max_prefill_tokens=64)
    # not started: nothing drains the queue, so the third submit must be refused at once
    for i in range(2):
        e.submit(Sequence(str(i), [1, 5], SamplingParams(max_new_tokens=2), Collector()))
    with pytest.raises(ResourceExhausted, match="2 requests"):
        e.submit(Sequence("x", [1, 5], SamplingParams(max_new_tokens=2), Collector()))
    e.start()
    e.stop()
    with pytest.raises(Unavailable):
        e.submit(Sequence("y", [1, 5], SamplingParams(max_new_tokens=2), Collector()))


def test_forward_failure_fails_only_that_step(engine, monkeypatch):
    real = engine.model.forward
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(engine.model, "forward", flaky)
    bad = Collector()
    engine.submit(Sequence("bad", [1, 5], SamplingParams(max_new_tokens=3), bad))
    assert bad.finish.reason == FinishReason.ERROR and bad.finish.error is not None
    good = Collector()
    engine.submit(Sequence("good", [1, 5], SamplingParams(max_new_tokens=3), good))
    assert good.finish.reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert wait_idle(engine)
