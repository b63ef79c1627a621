"""Tenant quotas hold across replicas; any replica sweeps what dead writers left (issue 20, finding 8).

Two real `python -m server` processes over the tiny model share one --data-dir (port 0: each
prints the port it bound). Uploads race through both at once: exactly the quota is stored, for
max_adapters and for max_adapter_bytes. A writer killed with kill -9 mid-upload leaves a .part in
the store; the replicas' rescans remove it while a live writer's .part stays and still commits.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client import LoraFleetClient
from client.common import upload_messages
from server.api.auth import create_key
from tests.serving_fixtures import make_adapter

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
START_S, SWEEP_S = 90.0, 30.0          # deadlines (not assertions about speed)
PORT_LINE = re.compile(r"^lorafleet: serving .* on 127\.0\.0\.1:(\d+)$", re.M)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto"), os.environ.get("PYTHONPATH", "")])}


def _wait(what: str, probe, deadline_s: float, why=lambda: ""):
    end = time.monotonic() + deadline_s
    while not (value := probe()):
        if time.monotonic() > end:
            pytest.fail(f"gave up after {deadline_s:.0f} s waiting for {what}. {why()}")
        time.sleep(0.1)
    return value


@dataclass
class Replica:
    proc: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def port(self) -> int | None:
        if self.proc.poll() is not None:
            pytest.fail(f"replica exited: {self.tail()}")
        m = PORT_LINE.search(self.log.read_text(errors="replace"))
        return int(m.group(1)) if m else None


@dataclass
class Fleet:
    targets: list[str]
    keys: dict[str, str]
    data: Path
    adapter: Path
    archive_bytes: int


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet-quotas")
    adapter, _ = make_adapter(tiny_model_dir, work / "adapters", "lora", seed=21)
    size = upload_messages(adapter, "x")[0].metadata.total_bytes
    keys_file = work / "keys.json"
    keys = {t: create_key(keys_file, t, admin=False) for t in ("three", "bytes", "sweeper")}
    doc = json.loads(keys_file.read_text())
    for entry in doc["keys"]:
        entry["quotas"] = {"three": {"max_adapters": 3},
                           "bytes": {"max_adapter_bytes": 3 * size + size // 2}}.get(entry["tenant"], {})
    keys_file.write_text(json.dumps(doc))
    replicas = []
    try:
        for i in range(2):
            log = work / f"r{i}.log"
            argv = ["--model", "tiny", "--cache-dir", str(tiny_model_dir.parent), "--data-dir", str(work / "data"),
                    "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--api-keys", str(keys_file),
                    "--rescan-interval-s", "0.5", "--threads", "1", "--max-batch-size", "2",
                    "--max-context-tokens", "64", "--max-prompt-tokens", "32", "--max-new-tokens", "4",
                    "--default-new-tokens", "2"]
            with log.open("wb") as out:
                replicas.append(Replica(subprocess.Popen([sys.executable, "-m", "server", *argv], cwd=REPO, env=ENV,
                                                         stdout=out, stderr=subprocess.STDOUT), log))
        ports = [_wait("a replica to print its port", r.port, START_S, r.tail) for r in replicas]
        yield Fleet([f"127.0.0.1:{p}" for p in ports], keys, work / "data", adapter, size)
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.terminate()
                try:
                    r.proc.wait(15)
                except subprocess.TimeoutExpired:
                    r.proc.kill()


def _race(fleet: Fleet, tenant: str, names: list[str]) -> dict[str, tuple[str, str]]:
    """Upload `names` at once, alternating between the two replicas: name -> (code, quota refused)."""
    start, lock, out = threading.Barrier(len(names)), threading.Lock(), {}

    def upload(i: int, name: str) -> None:
        with LoraFleetClient(fleet.targets[i % 2], api_key=fleet.keys[tenant], timeout=60) as c:
            start.wait(30)
            try:
                c.upload_adapter(fleet.adapter, name)
                result = ("OK", "")
            except grpc.RpcError as e:
                failure, status = error_details_pb2.QuotaFailure(), rpc_status.from_call(e)
                quota = failure.violations[0].description if status and status.details and \
                    status.details[0].Unpack(failure) else e.details()
                result = (e.code().name, quota)
        with lock:
            out[name] = result

    threads = [threading.Thread(target=upload, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "an upload hung"
    return out


def _stored(fleet: Fleet, tenant: str) -> list[str]:
    tenant_dir = fleet.data / "adapters" / tenant
    return sorted(p.name for p in tenant_dir.iterdir() if any(p.glob("v*"))) if tenant_dir.is_dir() else []


def _upload(fleet: Fleet, tenant: str, target: int, name: str) -> str:
    with LoraFleetClient(fleet.targets[target], api_key=fleet.keys[tenant], timeout=60) as c:
        try:
            return f"OK@{c.upload_adapter(fleet.adapter, name).version}"
        except grpc.RpcError as e:
            return e.code().name


def test_max_adapters_holds_across_two_replicas(fleet):
    """8 concurrent uploads of distinct names, 4 through each replica, max_adapters=3."""
    results = _race(fleet, "three", [f"race{i}" for i in range(8)])
    codes = sorted(code for code, _ in results.values())
    assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 5, results
    assert all("max_adapters" in quota for code, quota in results.values() if code != "OK"), results
    stored = _stored(fleet, "three")
    assert stored == sorted(n for n, (code, _) in results.items() if code == "OK")
    # a new version of a stored name is not a new adapter, through either replica; a new name is refused
    assert _upload(fleet, "three", 1, stored[0]) == "OK@2" and _upload(fleet, "three", 0, stored[1]) == "OK@2"
    assert [_upload(fleet, "three", i, "one-more") for i in (0, 1)] == ["RESOURCE_EXHAUSTED"] * 2
    assert _stored(fleet, "three") == stored


def test_max_adapter_bytes_holds_across_two_replicas(fleet):
    """max_adapter_bytes fits 3.5 archives: 8 concurrent uploads through both replicas store 3."""
    results = _race(fleet, "bytes", [f"b{i}" for i in range(8)])
    assert sorted(code for code, _ in results.values()) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 5, results
    assert all("max_adapter_bytes" in quota for code, quota in results.values() if code != "OK"), results
    assert len(_stored(fleet, "bytes")) == 3


_WRITER = """
import sys, time
from pathlib import Path
from server.adapters.store import AdapterStore
from tests.unit.adapter_fixtures import BASE, LIMITS
root, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
up = AdapterStore(root, BASE, LIMITS).begin_upload("sweeper", name, 10_000)
up.write(b"\\0" * 1000)
print("ready", flush=True)
deadline = time.monotonic() + 120
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go on")
    time.sleep(0.01)
up.abort()
print("aborted", flush=True)
"""


def _parts(fleet: Fleet) -> set[Path]:
    return set((fleet.data / "tmp").rglob("*.part"))


def test_kill_9_writers_part_is_swept_by_the_replicas_and_a_live_ones_kept(fleet, tmp_path):
    """A store writer killed mid-upload: the replicas (both live, so no one has the store to itself)
    remove its .part at a rescan; a live writer's .part, in a third process, stays."""
    before = _parts(fleet)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(fleet.data), str(tmp_path / n), n], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in ("killed", "alive")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        killed, alive = procs
        written = _parts(fleet) - before
        assert len(written) == 2
        mtimes = {p: p.stat().st_mtime_ns for p in written}
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        left = _wait("the killed writer's .part to be swept", lambda: (_parts(fleet) & written) if
                     len(_parts(fleet) & written) == 1 else None, SWEEP_S, lambda: str(_parts(fleet)))
        (live,) = left
        time.sleep(1.5)   # not a speed check: let a few more rescans pass; the live writer's file stays
        assert _parts(fleet) & written == {live} and live.stat().st_mtime_ns == mtimes[live]
        (tmp_path / "alive").touch()
        out, err = alive.communicate(timeout=60)
        assert alive.returncode == 0 and out.split() == ["aborted"], err[-2000:]
        assert not live.exists()
    finally:
        for p in procs:
            p.kill()
