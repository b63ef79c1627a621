"""The load test, short: locust (a subprocess, as `make loadtest` runs it) against a real server.

10 s of locust in all: light load over real tenants and adapters, through gRPC and the OpenAI-compatible
HTTP door, has no failures; overload is answered with RESOURCE_EXHAUSTED (never a timeout) and the
server recovers.
"""
from __future__ import annotations

import importlib.util

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LoraFleetClient
from loadtest.fleet import create_keys, upload_adapters
from loadtest.run import SCENARIOS, Summary, read_summary, run_locust
from loadtest.traffic import write_adapters_file
from server.main import BackgroundServer
from tests.integration.conftest import make_config

SMALL = ["--max-new-tokens", "8", "--prompt-chars", "64", "--request-timeout", "30"]


def _locust(port: int, prefix, classes: list[str], users: int, seconds: float, extra: list[str]) -> Summary:
    if importlib.util.find_spec("locust") is None:
        pytest.fail("locust is not installed: run `make setup` (it installs the dev extras)")
    proc = run_locust(f"127.0.0.1:{port}", classes, users, users, seconds, prefix, extra, html=False)
    log = proc.log.read_text()[-3000:]
    assert proc.returncode in (0, 1), f"locust exited with {proc.returncode}:\n{log}"
    return read_summary(prefix)


def test_light_load_has_no_failures(tiny_loaded, tmp_path):
    """8 tenants with an adapter each over 4 device slots: generation (gRPC and HTTP), classification,
    uploads and hot swaps under traffic, --strict (nothing may be unimplemented), and not one failure."""
    keys = tmp_path / "keys.json"
    tenant_keys = create_keys(keys, 8)
    cfg = make_config(tmp_path, api_keys=keys, adapter_slots=4, http_port=0)
    with BackgroundServer(cfg, tiny_loaded) as running:
        tenants = upload_adapters(f"127.0.0.1:{running.port}", tenant_keys, rank=4)
        write_adapters_file(tmp_path / "tenants.txt", tenants)
        s = _locust(running.port, tmp_path / "light", SCENARIOS["all"], len(SCENARIOS["all"]), 5,
                    SMALL + ["--think-time", "0.05", "--strict", "--adapters", str(tmp_path / "tenants.txt"),
                             "--http-target", f"127.0.0.1:{running.http_port}"])
    assert s.failures_by_code == {} and not s.tolerated, s.render(5)
    for name in ("Generate", "GenerateStream", "Classify", "UploadAdapter", "ListModels", "Completions",
                 "CompletionsStream"):
        assert s.rows[name].count > 0, s.render(5)
    assert s.rows["ttft:CompletionsStream"].count >= s.rows["CompletionsStream"].count
    assert s.rows["Completions"].size == 8              # usage.completion_tokens, as gRPC's
    # every finished stream had a first token (a stream cut by the end of the run may have only that)
    assert s.rows["ttft:GenerateStream"].count >= s.rows["GenerateStream"].count
    assert s.rows["ttft:GenerateStream"].p50 <= s.rows["GenerateStream"].p50
    assert s.rows["Generate"].size == 8                 # response_length = generated tokens
    assert s.tokens_per_s > 0


def test_overload_answers_resource_exhausted_and_recovers(tiny_loaded, tmp_path):
    cfg = make_config(tmp_path, max_batch_size=1, max_queued_requests=2)
    with BackgroundServer(cfg, tiny_loaded) as running:
        s = _locust(running.port, tmp_path / "overload", SCENARIOS["zipf"], 24, 5,
                    ["--max-new-tokens", "24", "--prompt-chars", "64", "--think-time", "0", "--request-timeout", "30"])
        # backpressure is an immediate RESOURCE_EXHAUSTED, never a deadline or an UNAVAILABLE
        assert s.failures_by_code.get("RESOURCE_EXHAUSTED", 0) > 0, s.render(5)
        assert set(s.failures_by_code) == {"RESOURCE_EXHAUSTED"}, s.render(5)
        served = sum(s.rows[n].count - s.rows[n].failures for n in ("Generate", "GenerateStream"))
        assert served > 0, s.render(5)
        # and recovers: a normal request succeeds, health is SERVING
        assert running.engine.alive
        with LoraFleetClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            assert c.generate("after the storm", max_new_tokens=4, ignore_eos=True).completion_tokens == 4
            check = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
