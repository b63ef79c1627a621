"""Issue 20, findings 1 and 9, from outside over real gRPC and HTTP: one request with an extreme
(accepted) sampling value, or one tenant sending more than the queue holds, never hurts another
tenant."""
from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LoraFleetClient
from server.api.auth import create_key
from server.main import BackgroundServer
from tests.integration.conftest import make_config

CANARY = "the canary says"


@pytest.fixture()
def tenants(tmp_path):
    keys = tmp_path / "keys.json"
    flood, lone = create_key(keys, "flood", False), create_key(keys, "lone", False)
    doc = json.loads(keys.read_text())
    doc["keys"][0]["quotas"] = {"max_queued_requests": 10_000, "max_concurrent_requests": 10_000}
    keys.write_text(json.dumps(doc))
    return keys, flood, lone


def test_tiny_temperatures_on_both_doors_never_take_the_engine_down(tiny_loaded, tmp_path, tenants):
    """Finding 1: temperature 1e-38 (inside the documented range) used to overflow to inf and kill
    the engine thread: every tenant's request then got INTERNAL and health NOT_SERVING."""
    keys, mallory, alice = tenants
    with BackgroundServer(make_config(tmp_path, api_keys=keys, http_port=0), tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=mallory, timeout=60) as bad, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=alice, timeout=60) as good:
        want = good.generate(CANARY, max_new_tokens=12, ignore_eos=True).token_ids
        got = {}
        canary = threading.Thread(target=lambda: got.update(r=good.generate(CANARY, max_new_tokens=12,
                                                                              ignore_eos=True)))
        canary.start()
        for t in (1e-38, 1e-30, 5e-324):
            r = bad.generate("hello", max_new_tokens=4, temperature=t, ignore_eos=True)
            assert r.completion_tokens == 4
        body = {"model": srv.engine.loaded.name, "prompt": "hello", "max_tokens": 4, "temperature": 1e-38,
                "top_p": 1e-38}
        resp = httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {mallory}"})
        assert resp.status_code == 200, resp.text
        canary.join(60)
        assert got["r"].token_ids == want
        health = health_pb2_grpc.HealthStub(good.channel).Check(health_pb2.HealthCheckRequest()).status
        assert health == health_pb2.HealthCheckResponse.SERVING
        assert srv.engine.alive and srv.engine.restarts == 0


def test_a_tenant_whose_quota_exceeds_the_queue_cannot_fill_it(tiny_loaded, tmp_path, tenants):
    """Finding 9: tenant A (queue quota 10,000) sends three times the queue's 16 places; tenant B's
    request is still accepted and answered (it used to get RESOURCE_EXHAUSTED)."""
    keys, flood_key, lone_key = tenants
    cfg = make_config(tmp_path, api_keys=keys, max_queued_requests=16, max_batch_size=2, max_new_tokens=48)
    with BackgroundServer(cfg, tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=flood_key, timeout=120) as a, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=lone_key, timeout=120) as b:
        futures = [a.inference.Generate.future(a.request(f"flood {i}", max_new_tokens=48, ignore_eos=True),
                                               metadata=a.metadata, timeout=120) for i in range(48)]
        deadline = time.monotonic() + 30
        while srv.engine.queued("flood") < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.engine.queued("flood") == 12            # three quarters of the queue, no more
        r = b.generate("my turn", max_new_tokens=4, ignore_eos=True)
        assert r.completion_tokens == 4
        refused = 0
        for f in futures:
            try:
                f.result()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                refused += 1
        assert refused > 0
