"""Generation over real gRPC: unary, streaming, concurrency, limits, health, cancellation."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LoraFleetClient
from server.main import BackgroundServer
from tests.integration.conftest import make_config

PROMPTS = ["Hello", "The quick brown fox jumps over", "a", "lorafleet serves many adapters at once",
           "0123456789" * 5, "Once upon a time", "x y z", "multi-tenant inference",
           "GPU", "tokens", "batching is continuous", "é ü 😀", "short", "a much longer prompt " * 6,
           "end", "the last one"]


def test_unary_generate_greedy_is_deterministic(client):
    a = client.generate("Hello there", max_new_tokens=12)
    b = client.generate("Hello there", max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.finish_reason in ("length", "eos")
    assert a.prompt_tokens == 12  # BOS + 11 bytes
    assert a.completion_tokens == len(a.token_ids) + (a.finish_reason == "eos")


def test_stream_equals_unary(client):
    whole = client.generate("Streaming test", max_new_tokens=20)
    pieces = list(client.generate_stream("Streaming test", max_new_tokens=20))
    assert pieces[-1].finish_reason == whole.finish_reason
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert len(pieces) > 2


def test_concurrent_mixed_length_requests_equal_solo(client):
    """16 concurrent requests, mixed lengths: each gets exactly what it gets alone (greedy)."""
    lengths = [3 + (i * 7) % 30 for i in range(len(PROMPTS))]
    solo = [client.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda pn: client.generate(pn[0], max_new_tokens=pn[1]), zip(PROMPTS, lengths)))
    for s, t in zip(solo, together):
        assert s.token_ids == t.token_ids
        assert s.text == t.text


def test_seeded_sampling_is_reproducible(client):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=42)
    a = client.generate("sample me", **kw)
    b = client.generate("sample me", **kw)
    c = client.generate("sample me", **{**kw, "seed": 43})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_ends_before_it(client):
    full = client.generate("stop test", max_new_tokens=30)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = client.generate("stop test", max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    streamed = "".join(p.text for p in client.generate_stream("stop test", max_new_tokens=30, stop=[stop]))
    assert streamed == cut.text


@pytest.mark.parametrize("params,needle", [
    (dict(max_new_tokens=10_000), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=-2.0), "repetition_penalty"),
    (dict(stop=["x"] * 100), "stop"),
    (dict(stop=[""]), "stop"),
])
def test_bad_params_are_invalid_argument(client, params, needle):
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hi", **params)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_prompt_too_long_is_invalid_argument_with_limits(client):
    with pytest.raises(grpc.RpcError) as e:
        client.generate("z" * 300)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "200" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.generate("")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_adapter_is_not_found(client):
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hi", adapter="nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_serving_and_server_info(server, client):
    stub = health_pb2_grpc.HealthStub(client.channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service="lorafleet.v1.Inference")).status == \
        health_pb2.HealthCheckResponse.SERVING
    info = client.server_info()
    assert info.hidden_size == 64 and info.num_layers == 2
    assert info.limits.max_prompt_tokens == 200 and info.limits.max_new_tokens == 48
    lim = info.limits                       # issue 22: the paged KV cache (2 layers x 2 KV heads x 16 x fp32)
    assert lim.max_context_tokens == 256 and lim.kv_block_size == 16 and lim.prefix_cache
    assert lim.kv_cache_tokens >= 256 and lim.kv_cache_bytes == lim.kv_cache_tokens * 2 * 2 * 2 * 16 * 4


def test_reflection_lists_services(client):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"lorafleet.v1.Inference", "lorafleet.v1.Adapters", "grpc.health.v1.Health"} <= names


def test_cancellation_frees_capacity(tiny_loaded, tmp_path):
    """One slot: a cancelled long stream must free it for the next request at once."""
    cfg = make_config(tmp_path, max_batch_size=1, max_new_tokens=200, max_context_tokens=256)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}") as c:
        stream = c.inference.GenerateStream(c.request("long one", max_new_tokens=200))
        next(stream)
        stream.cancel()
        t0 = time.monotonic()
        r = c.generate("next", max_new_tokens=4)
        assert r.completion_tokens >= 1
        deadline = time.monotonic() + 5
        while srv.engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.engine.scheduler.running
        assert time.monotonic() - t0 < 30


def test_deadline_propagates_into_the_engine(server, client, monkeypatch):
    """The call's gRPC deadline becomes the sequence's deadline (the engine reaps expired
    sequences and frees their slots: tests/unit/test_engine.py)."""
    seen = []
    real = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda seq, ref=None: (seen.append(seq), real(seq, ref)))
    t0 = time.monotonic()
    client.generate("deadline", max_new_tokens=2, timeout=7.0)
    assert len(seen) == 1 and seen[0].deadline is not None
    assert t0 + 5.0 < seen[0].deadline < t0 + 7.5
    client.generate("no deadline", max_new_tokens=2, timeout=None)
    assert seen[1].deadline is None


def test_full_queue_is_resource_exhausted(tiny_loaded, tmp_path):
    cfg = make_config(tmp_path, max_batch_size=1, max_queued_requests=2, max_new_tokens=200,
                      max_context_tokens=256)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}") as c:
        codes, lock = [], threading.Lock()

        def call(i):
            try:
                c.generate(f"q{i}", max_new_tokens=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # and it recovers
        assert c.generate("after", max_new_tokens=3).completion_tokens >= 1


def test_drain_rejects_new_calls_with_unavailable(tiny_loaded, tmp_path):
    cfg = make_config(tmp_path)
    bg = BackgroundServer(cfg, tiny_loaded)
    srv = bg.__enter__()
    try:
        c = LoraFleetClient(f"127.0.0.1:{srv.port}")
        srv.draining.on = True
        with pytest.raises(grpc.RpcError) as e:
            c.generate("hi")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        c.close()
    finally:
        srv.draining.on = False
        bg.__exit__(None, None, None)
    assert not bg.thread.is_alive()


def test_200_concurrent_calls_beyond_the_bound(tiny_loaded, tmp_path):
    """200 calls at once against a queue of 16: the excess gets RESOURCE_EXHAUSTED (not
    timeouts), the rest are served, and the server stays healthy and serves a burst afterwards."""
    cfg = make_config(tmp_path, max_batch_size=4, max_queued_requests=16)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=120) as c:
        def call(i):
            try:
                c.generate(f"burst {i}", max_new_tokens=8)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

        with ThreadPoolExecutor(200) as ex:
            got = list(ex.map(call, range(200)))
        assert set(got) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(got)
        assert got.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0 and got.count(grpc.StatusCode.OK) >= 16
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with ThreadPoolExecutor(8) as ex:
            assert all(r.completion_tokens >= 1 for r in ex.map(lambda i: c.generate(f"after {i}", max_new_tokens=4),
                                                                 range(8)))
