"""Process lifecycle: SIGTERM drains a real server process; an engine crash turns health
NOT_SERVING and fails calls with INTERNAL instead of hanging them."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LoraFleetClient
from lorafleet.v1 import lorafleet_pb2 as pb
from server.main import BackgroundServer
from tests.integration.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_drains_in_flight_and_exits_zero(tiny_model_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", "0", "--metrics-port", "-1",
         "--data-dir", str(tmp_path / "data"), "--max-new-tokens", "400", "--max-context-tokens", "512",
         "--shutdown-grace-s", "20"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "server did not print its address"
        c = LoraFleetClient(f"127.0.0.1:{port}", timeout=60)
        stream = c.inference.GenerateStream(c.request("drain me", max_new_tokens=400, ignore_eos=True))
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)                         # the in-flight call finishes
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 400
        with pytest.raises(grpc.RpcError) as e:
            c.generate("too late", max_new_tokens=2, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def _health_becomes(c: LoraFleetClient, want) -> None:
    health = health_pb2_grpc.HealthStub(c.channel)
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest()).status
        if status == want:
            return
        time.sleep(0.05)
    assert status == want


def test_engine_bug_restarts_the_loop_and_health_comes_back(tiny_loaded, tmp_path):
    """A bug outside any request's rows (the scheduler) fails the call in flight with UNAVAILABLE
    (retryable); the supervisor restarts the loop and the next call is served."""
    cfg = make_config(tmp_path)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
        assert c.generate("fine", max_new_tokens=2).completion_tokens >= 1
        sched = srv.engine.scheduler
        real = sched.schedule
        calls = {"n": 0}

        def once():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("a bug in the scheduler")
            return real()
        sched.schedule = once
        with pytest.raises(grpc.RpcError) as e:
            c.generate("crash", max_new_tokens=8, ignore_eos=True)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        _health_becomes(c, health_pb2.HealthCheckResponse.SERVING)
        assert c.generate("after", max_new_tokens=2).completion_tokens >= 1
        assert srv.engine.alive and srv.engine.restarts == 1


def test_engine_bug_that_recurs_fails_calls_and_turns_health_not_serving(tiny_loaded, tmp_path, monkeypatch):
    from server.engine.scheduler import Scheduler
    cfg = make_config(tmp_path)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
        assert c.generate("fine", max_new_tokens=2).completion_tokens >= 1

        def boom(self):
            raise RuntimeError("a bug in the scheduler")
        monkeypatch.setattr(Scheduler, "schedule", boom)
        deadline = time.monotonic() + 30
        while srv.engine.alive and time.monotonic() < deadline:
            with pytest.raises(grpc.RpcError):
                c.generate("crash", max_new_tokens=2)
        _health_becomes(c, health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as e:
            c.generate("after", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "restart" in e.value.details()
        assert not srv.engine.alive


def test_classify_failing_part_way_leaks_nothing(tiny_loaded, tiny_model_dir, tmp_path):
    """A Classify batch refused part-way (queue full at its 3rd text) cancels the texts already
    submitted and releases their quota and adapter pins."""
    from tests.serving_fixtures import make_cls_adapter
    cfg = make_config(tmp_path, max_batch_size=1, max_queued_requests=2)
    d, _ = make_cls_adapter(tiny_model_dir, tmp_path / "peft", seed=31)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
        c.upload_adapter(d, "cls")
        with pytest.raises(grpc.RpcError) as e:
            c.classify(["a", "b", "c", "d", "e"], adapter="cls")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 10
        while srv.engine.scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.engine.scheduler.has_work()
        registry = srv.engine.adapters.registry
        assert registry.in_flight("default/cls@1") == 0
        assert len(c.classify(["a", "b"], adapter="cls")) == 2


def test_replicas_sharing_a_store_follow_uploads_and_deletes(tiny_loaded, tiny_model_dir, tmp_path):
    from tests.serving_fixtures import make_adapter
    d, _ = make_adapter(tiny_model_dir, tmp_path / "peft", "lora", seed=41)
    shared = tmp_path / "shared-store"
    cfg = make_config(tmp_path, data_dir=shared, rescan_interval_s=0.1)
    with BackgroundServer(cfg, tiny_loaded) as a, BackgroundServer(cfg, tiny_loaded) as b, \
            LoraFleetClient(f"127.0.0.1:{a.port}", timeout=30) as ca, \
            LoraFleetClient(f"127.0.0.1:{b.port}", timeout=30) as cb:
        ca.upload_adapter(d, "everywhere")
        want = ca.generate("replica", max_new_tokens=6, adapter="everywhere").token_ids

        def until(fn, timeout=10.0):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return fn()
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        assert until(lambda: cb.generate("replica", max_new_tokens=6, adapter="everywhere")).token_ids == want
        ca.delete_adapter("everywhere")

        def gone():
            cb.generate("replica", max_new_tokens=2, adapter="everywhere")
            raise AssertionError("still served")
        deadline = time.monotonic() + 10
        while True:
            try:
                gone()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                break
            except AssertionError:
                assert time.monotonic() < deadline, "replica b kept serving a deleted adapter"
                time.sleep(0.05)
