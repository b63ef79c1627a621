"""Multi-tenant serving over real gRPC: keys, isolation, shared adapters, quotas, uploads,
hot swap and delete under traffic, classification."""
from __future__ import annotations
from lorafleet.archive import archive_dir

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LoraFleetClient

from lorafleet.v1 import lorafleet_pb2 as pb
from server.api.auth import create_key
from server.main import BackgroundServer
from tests.integration.conftest import make_config
from tests.serving_fixtures import make_adapter, make_cls_adapter


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("peft")


@pytest.fixture(scope="module")
def cluster(tiny_loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    keys = root / "keys.json"
    k = {"a": create_key(keys, "acme", False), "b": create_key(keys, "beta", False),
         "admin": create_key(keys, "ops", True), "small": create_key(keys, "small", False)}
    doc = json.loads(keys.read_text())
    for e in doc["keys"]:
        if e["tenant"] == "small":
            e["quotas"] = {"max_adapters": 1, "max_concurrent_requests": 2}
    keys.write_text(json.dumps(doc))
    cfg = make_config(root, api_keys=keys, adapter_slots=4, max_adapter_rank=16)
    with BackgroundServer(cfg, tiny_loaded) as srv:
        clients = {n: LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=key, timeout=60) for n, key in k.items()}
        yield srv, clients
        for c in clients.values():
            c.close()


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)


def codes(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_keys_required_and_health_open(cluster):
    srv, c = cluster
    anon = LoraFleetClient(f"127.0.0.1:{srv.port}")
    bad = LoraFleetClient(f"127.0.0.1:{srv.port}", api_key="lf_not-a-key")
    assert codes(lambda: anon.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
    assert codes(lambda: bad.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
    assert codes(lambda: bad.list_adapters()) == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(anon.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert c["a"].generate("hi", max_new_tokens=2).completion_tokens >= 1


def test_tenant_isolation(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d, _ = make_adapter(tiny_model_dir, adapters_dir, "lora", seed=1)
    info = c["a"].upload_adapter(d, "secret")
    assert info.version == 1 and info.name == "secret"
    base = c["a"].generate("probe", max_new_tokens=8)
    mine = c["a"].generate("probe", max_new_tokens=8, adapter="secret")
    assert mine.token_ids != base.token_ids
    # beta learns nothing: same status and message as for a name nobody has
    e1 = pytest.raises(grpc.RpcError, c["b"].generate, "probe", adapter="secret").value
    e2 = pytest.raises(grpc.RpcError, c["b"].generate, "probe", adapter="nobody-has-this").value
    assert e1.code() == e2.code() == grpc.StatusCode.NOT_FOUND
    assert e1.details().replace("secret", "X") == e2.details().replace("nobody-has-this", "X")
    assert codes(lambda: c["b"].get_adapter("secret")) == grpc.StatusCode.NOT_FOUND
    assert codes(lambda: c["b"].delete_adapter("secret")) == grpc.StatusCode.NOT_FOUND
    assert "secret" not in [a.name for a in c["b"].list_adapters()]
    assert "secret" in [a.name for a in c["a"].list_adapters()]
    got = c["a"].get_adapter("secret")
    assert got.rank > 0 and "q_proj" in got.targets and list(got.versions) == [1]


def test_shared_adapters_admin_only(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d, _ = make_adapter(tiny_model_dir, adapters_dir, "ia3", seed=2)
    assert codes(lambda: c["a"].upload_adapter(d, "common", shared=True)) == grpc.StatusCode.PERMISSION_DENIED
    info = c["admin"].upload_adapter(d, "common", shared=True)
    assert info.shared and info.name == "shared/common"
    ra = c["a"].generate("x", max_new_tokens=6, adapter="shared/common")
    rb = c["b"].generate("x", max_new_tokens=6, adapter="shared/common")
    assert ra.token_ids == rb.token_ids
    assert "shared/common" in [a.name for a in c["b"].list_adapters()]
    assert codes(lambda: c["b"].delete_adapter("shared/common")) == grpc.StatusCode.PERMISSION_DENIED


def test_quotas(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d, _ = make_adapter(tiny_model_dir, adapters_dir, "lora", seed=3)
    c["small"].upload_adapter(d, "one")
    c["small"].upload_adapter(d, "one")          # a new version of the same name is fine
    with pytest.raises(grpc.RpcError) as e:
        c["small"].upload_adapter(d, "two")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapters=1" in e.value.details()
    streams = [c["small"].inference.GenerateStream(c["small"].request("long", max_new_tokens=40, ignore_eos=True),
                                                   metadata=c["small"].metadata) for _ in range(2)]
    for s in streams:
        next(s)
    with pytest.raises(grpc.RpcError) as e:
        c["small"].generate("third", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests=2" in e.value.details()
    for s in streams:
        list(s)
    assert c["small"].generate("after", max_new_tokens=2).completion_tokens >= 1


def _upload_raw(client: LoraFleetClient, name: str, data: bytes, declared: int | None = None, sha: str = ""):
    def parts():
        yield pb.UploadAdapterRequest(metadata=pb.UploadMetadata(
            name=name, total_bytes=len(data) if declared is None else declared, sha256=sha))
        for i in range(0, len(data), 4096):
            yield pb.UploadAdapterRequest(chunk=data[i:i + 4096])
    return client.adapters.UploadAdapter(parts(), metadata=client.metadata, timeout=30)


def test_hostile_uploads_rejected_and_store_unchanged(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    good = archive_dir(make_adapter(tiny_model_dir, adapters_dir, "lora", seed=4)[0])
    before = [a.name for a in c["b"].list_adapters()]
    cases = [
        ("garbage", b"\x80\x04 not a zip at all" * 10, None, "", grpc.StatusCode.INVALID_ARGUMENT),
        ("overflow", good, len(good) // 2, "", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("short", good[:100], len(good), "", grpc.StatusCode.INVALID_ARGUMENT),
        ("badsha", good, None, "0" * 64, grpc.StatusCode.DATA_LOSS),
        ("../escape", good, None, "", grpc.StatusCode.INVALID_ARGUMENT),
        ("UPPER", good, None, "", grpc.StatusCode.INVALID_ARGUMENT),
        ("", good, None, "", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for name, data, declared, sha, want in cases:
        with pytest.raises(grpc.RpcError) as e:
            _upload_raw(c["b"], name, data, declared, sha)
        assert e.value.code() == want, (name, e.value.details())
        assert e.value.details()
    assert [a.name for a in c["b"].list_adapters()] == before
    # metadata must come first
    with pytest.raises(grpc.RpcError) as e:
        c["b"].adapters.UploadAdapter(iter([pb.UploadAdapterRequest(chunk=b"x")]), metadata=c["b"].metadata)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _upload_raw(c["b"], "fine", good, sha=hashlib.sha256(good).hexdigest())
    assert info.version == 1


def test_hot_swap_under_traffic(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d1, _ = make_adapter(tiny_model_dir, adapters_dir, "lora", seed=5)
    d2, _ = make_adapter(tiny_model_dir, adapters_dir, "lora", seed=6)
    c["a"].upload_adapter(d1, "swap")
    v1 = c["a"].generate("swap me", max_new_tokens=8, adapter="swap@1").token_ids
    stop, results, errors = threading.Event(), [], []

    def traffic():
        while not stop.is_set():
            try:
                results.append(c["a"].generate("swap me", max_new_tokens=8, adapter="swap").token_ids)
            except grpc.RpcError as e:
                errors.append(e.code())

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 3, "traffic before the swap")
    assert c["a"].upload_adapter(d2, "swap").version == 2
    v2 = c["a"].generate("swap me", max_new_tokens=8, adapter="swap@2").token_ids
    n_at_swap = len(results)
    wait_for(lambda: len(results) >= n_at_swap + 6, "traffic after the swap")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert v1 != v2
    assert all(r in (v1, v2) for r in results)      # each request saw exactly one version
    assert results[-1] == v2
    assert c["a"].generate("swap me", max_new_tokens=8, adapter="swap").token_ids == v2


def test_delete_while_running(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d, _ = make_adapter(tiny_model_dir, adapters_dir, "prefix", seed=7)
    c["b"].upload_adapter(d, "doomed")
    stream = c["b"].inference.GenerateStream(
        c["b"].request("running", adapter="doomed", max_new_tokens=40, ignore_eos=True), metadata=c["b"].metadata)
    first = next(stream)
    assert c["b"].delete_adapter("doomed") == [1]
    assert codes(lambda: c["b"].generate("new", adapter="doomed")) == grpc.StatusCode.NOT_FOUND
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 40


def test_classify_over_grpc(cluster, tiny_model_dir, adapters_dir):
    _, c = cluster
    d, _ = make_cls_adapter(tiny_model_dir, adapters_dir, seed=8)
    c["a"].upload_adapter(d, "sentiment")
    out = c["a"].classify(["great stuff", "terrible", "meh"], adapter="sentiment")
    assert len(out) == 3
    for r in out:
        assert set(r["scores"]) == {"neg", "neu", "pos"}
        assert abs(sum(r["scores"].values()) - 1) < 1e-4
        assert r["label"] == max(r["scores"], key=r["scores"].get)
    assert codes(lambda: c["a"].classify(["x"], adapter="secret")) == grpc.StatusCode.FAILED_PRECONDITION
    assert codes(lambda: c["a"].classify([], adapter="sentiment")) == grpc.StatusCode.INVALID_ARGUMENT
    with ThreadPoolExecutor(4) as ex:      # classify and generate share batches
        futs = [ex.submit(c["a"].classify, ["great stuff"], "sentiment") for _ in range(3)]
        gens = [ex.submit(c["a"].generate, "mixed", max_new_tokens=5, adapter="secret") for _ in range(3)]
        assert all(f.result() == [out[0]] or abs(f.result()[0]["scores"]["pos"] - out[0]["scores"]["pos"]) < 1e-5
                   for f in futs)
        assert len({tuple(g.result().token_ids) for g in gens}) == 1


def test_keys_reload(cluster, tmp_path):
    srv, c = cluster
    new_key = create_key(srv.auth.keys_file, "late", False)
    late = LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=new_key)
    assert codes(lambda: late.generate("x")) == grpc.StatusCode.UNAUTHENTICATED
    srv.auth.reload()
    assert late.generate("x", max_new_tokens=2).completion_tokens >= 1
    srv.auth.keys_file.write_text("{not json")
    srv.auth.reload()                               # a broken file keeps the old keys
    assert late.generate("x", max_new_tokens=2).completion_tokens >= 1
