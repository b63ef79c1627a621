"""Issue 16's findings, each tried from outside over real gRPC (each failed on the code before
the fix): racing uploads past a quota, malformed message bytes, stale gauges after cancels,
expired deadlines answered OK, and the smaller ones (kinds, sha256 case, auth headers)."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request

import grpc
import pytest

from client import LoraFleetClient
from client.common import upload_messages
from lorafleet.v1 import lorafleet_pb2 as pb
from server.api.auth import create_key
from server.main import BackgroundServer
from tests.integration.conftest import code_of, make_config
from tests.serving_fixtures import make_adapter


@pytest.fixture(scope="module")
def quota_server(tiny_loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    keys = root / "keys.json"
    key = create_key(keys, "racer", False)
    doc = json.loads(keys.read_text())
    doc["keys"][0]["quotas"] = {"max_adapters": 3}
    keys.write_text(json.dumps(doc))
    with BackgroundServer(make_config(root, api_keys=keys), tiny_loaded) as srv:
        yield srv, key


def test_racing_uploads_cannot_pass_the_adapter_quota(quota_server, tiny_model_dir, tmp_path):
    """Finding 1: 10 concurrent uploads of distinct names under max_adapters=3 -> exactly 3 stored."""
    srv, key = quota_server
    d, _ = make_adapter(tiny_model_dir, tmp_path, "lora", seed=5)
    results: list[grpc.StatusCode] = []
    lock, start = threading.Lock(), threading.Barrier(10)

    def upload(i: int) -> None:
        with LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=key, timeout=60) as c:
            start.wait(10)
            try:
                c.upload_adapter(d, f"race{i}")
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
        with lock:
            results.append(code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(c.name for c in results) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 7
    with LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=key, timeout=60) as c:
        assert len(c.list_adapters()) == 3


def raw_call(port: int, method: str, payload: bytes, stream: bool = False):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        if stream:
            call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
            return call(iter([payload]), timeout=30)
        return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=30)
    finally:
        channel.close()


BAD_UTF8 = bytes.fromhex("0a0748656cfffe6c6f")     # field 1 (prompt / metadata), 'Hel\xff\xfelo'


@pytest.mark.parametrize("method, stream", [("/lorafleet.v1.Inference/Generate", False),
                                            ("/lorafleet.v1.Inference/GenerateStream", False),
                                            ("/lorafleet.v1.Adapters/GetAdapter", False),
                                            ("/lorafleet.v1.Adapters/UploadAdapter", True)])
def test_malformed_bytes_are_invalid_argument_without_a_traceback(server, caplog, method, stream):
    """Finding 4: invalid UTF-8 in a string field -> INVALID_ARGUMENT, no ERROR traceback."""
    caplog.set_level(logging.INFO)
    payload = BAD_UTF8 if "Upload" not in method else bytes.fromhex("0a0b") + BAD_UTF8 + b"\x10\x01"
    with pytest.raises(grpc.RpcError) as e:
        r = raw_call(server.port, method, payload, stream)
        if "Stream" in method:
            list(r)
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "not a valid" in e.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def gauge(metrics_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_running_gauge_returns_to_zero_after_cancels_without_new_traffic(tiny_loaded, tmp_path):
    """Finding 5: cancel 4 unary Generates; the gauge drops to 0 with no further request."""
    cfg = make_config(tmp_path, max_new_tokens=200, max_context_tokens=256)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}") as c:
        futures = [c.inference.Generate.future(c.request(f"slow {i}", max_new_tokens=200, ignore_eos=True),
                                               timeout=60) for i in range(4)]
        deadline = time.monotonic() + 20
        while gauge(srv.metrics_port, "lorafleet_running_requests") < 1:
            assert time.monotonic() < deadline, "requests never started running"
            time.sleep(0.05)
        for f in futures:
            f.cancel()
        deadline = time.monotonic() + 5
        while gauge(srv.metrics_port, "lorafleet_running_requests") != 0:
            assert time.monotonic() < deadline, "lorafleet_running_requests stayed above 0 after the cancels"
            time.sleep(0.1)
        assert not srv.engine.scheduler.running


def test_expired_deadlines_are_deadline_exceeded_never_ok(tiny_loaded, tmp_path):
    """Finding 6: no call cut short by its deadline answers OK; none expired in the queue runs."""
    cfg = make_config(tmp_path, max_batch_size=1, max_new_tokens=200, max_context_tokens=256)
    with BackgroundServer(cfg, tiny_loaded) as srv, LoraFleetClient(f"127.0.0.1:{srv.port}") as c:
        generated_before = srv.engine.steps
        codes = []
        for timeout in (0.001, 0.2):
            futures = [c.inference.Generate.future(c.request(f"d{i}", max_new_tokens=200, ignore_eos=True),
                                                   timeout=timeout) for i in range(20)]
            for f in futures:
                try:
                    r = f.result()
                    codes.append(("OK", r.finish_reason))
                except grpc.RpcError as e:
                    codes.append((e.code().name, None))
        assert all(code == "DEADLINE_EXCEEDED" for code, _ in codes), codes
        deadline = time.monotonic() + 10
        while srv.engine.scheduler.running or srv.engine.queued():
            assert time.monotonic() < deadline, "expired requests still hold the engine"
            time.sleep(0.05)
        # 40 calls, most of them expired before a slot freed: far fewer steps than 40 requests would take
        assert srv.engine.steps - generated_before < 40 * 20


def test_upload_reply_is_complete_and_unknown_kind_refused(server, tiny_model_dir, tmp_path):
    d, _ = make_adapter(tiny_model_dir, tmp_path, "lora", seed=6)
    with LoraFleetClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        info = c.upload_adapter(d, "complete")
        assert info.rank > 0 and list(info.targets)
        msgs = upload_messages(d, "kind99")
        msgs[0].metadata.kind = 99
        with pytest.raises(grpc.RpcError) as e:
            c.adapters.UploadAdapter(iter(msgs), timeout=30)
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "metadata.kind" in e.value.details()
        msgs = upload_messages(d, "upper-sha")
        msgs[0].metadata.sha256 = msgs[0].metadata.sha256.upper()
        assert c.adapters.UploadAdapter(iter(msgs), timeout=30).version == 1
        assert c.get_adapter("complete@1").version == 1
        with pytest.raises(grpc.RpcError) as e:
            c.delete_adapter("complete@1")
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "without '@1'" in e.value.details()


def test_authorization_headers(quota_server):
    srv, key = quota_server
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    info = channel.unary_unary("/lorafleet.v1.Inference/GetServerInfo",
                               request_serializer=pb.GetServerInfoRequest.SerializeToString,
                               response_deserializer=pb.ServerInfo.FromString)
    try:
        assert info(pb.GetServerInfoRequest(), metadata=(("authorization", f"bearer {key}"),), timeout=10).version
        with pytest.raises(grpc.RpcError) as e:
            info(pb.GetServerInfoRequest(), timeout=10,
                 metadata=(("authorization", f"Bearer {key}"), ("authorization", "Bearer lf_other")))
        assert code_of(e) == grpc.StatusCode.UNAUTHENTICATED and "exactly one" in e.value.details()
    finally:
        channel.close()


def test_quota_errors_carry_rich_details(quota_server, tiny_model_dir, tmp_path):
    """A quota refusal carries google.rpc.QuotaFailure naming the quota (no string matching)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    srv, key = quota_server
    d, _ = make_adapter(tiny_model_dir, tmp_path, "ia3", seed=7)
    with LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=key, timeout=60) as c:
        status = None
        for i in range(10):                      # max_adapters is 3: one of these must be refused
            try:
                c.upload_adapter(d, f"fill{i}")
            except grpc.RpcError as e:
                status = rpc_status.from_call(e)
                break
    assert status is not None, "the quota never refused an upload"
    failure = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(failure)
    assert failure.violations[0].subject == "tenant:racer" and "max_adapters" in failure.violations[0].description
