"""The fleet, for real: a real HAProxy (deploy/haproxy/haproxy.cfg) before 3 replicas on 127.0.0.1.

Three `python -m server` processes over the tiny model share one --data-dir and follow it with
--rescan-interval-s; HAProxy hashes each call on its `x-tenant` header. Through the proxy, from
several tenants: (a) each tenant's calls land on one replica (read from every replica's /metrics);
(b) an upload is usable on every replica after a rescan; (c) concurrent uploads of one name through
two replicas get distinct versions, none lost; (d) kill -9 of a replica: the proxy takes it out,
clients with retries see no failure beyond the calls in flight, and once restarted it serves every
stored version. Needs `haproxy` on PATH (`make setup-ops` installs it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import LoraFleetClient
from server.api.auth import create_key
from tests.serving_fixtures import make_adapter

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
MODEL_FLAGS = ("--model", "tiny")   # the seeded random test model
RESCAN_S = 0.5
TENANTS = ("acme", "beta", "cobalt", "delta", "echo", "fjord")
CALLS_PER_TENANT = 4
START_S, VISIBLE_S, DOWN_S = 90.0, 15.0, 15.0   # deadlines (not assertions about speed)
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, probe: Callable[[], T | None], deadline_s: float, why: Callable[[], str] = str) -> T:
    """Poll `probe` until it returns a value other than None/False, at most `deadline_s` seconds."""
    end = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"gave up after {deadline_s:.0f} s waiting for {what}. {why()}")
        time.sleep(0.1)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@dataclass
class Replica:
    name: str
    port: int
    metrics_port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.argv], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def serving(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"replica {self.name} exited: {_tail(self.log)}")
        with grpc.insecure_channel(self.target) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="lorafleet.v1.Inference"), timeout=1)
            except grpc.RpcError:
                return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tenant_requests(self) -> dict[str, float]:
        """tenant -> calls finished OK, from this replica's /metrics (per-tenant series)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:  # noqa: S310
            text = r.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "lorafleet_tenant_requests_total" and s.labels.get("code") == "OK":
                    out[s.labels["tenant"]] = out.get(s.labels["tenant"], 0.0) + s.value
        return out


@dataclass
class Fleet:
    replicas: list[Replica]
    proxy: str
    stats_url: str
    keys: dict[str, str]
    haproxy: subprocess.Popen
    haproxy_log: Path
    work: Path
    clients: list[LoraFleetClient] = field(default_factory=list)

    def client(self, tenant: str, target: str | None = None, retries: int = 0) -> LoraFleetClient:
        c = LoraFleetClient(target or self.proxy, api_key=self.keys[tenant], tenant=tenant, timeout=30,
                            retries=retries)
        self.clients.append(c)
        return c

    def server_states(self) -> dict[str, str]:
        """HAProxy's view: replica name -> UP / DOWN / ..., from its stats CSV."""
        with urllib.request.urlopen(self.stats_url, timeout=5) as r:  # noqa: S310 - 127.0.0.1 only
            rows = [line.split(",") for line in r.read().decode().splitlines()]
        header = rows[0]
        col = header.index("status")
        return {row[1]: row[col] for row in rows[1:] if row and row[0] == "lorafleet" and row[1].startswith("r")}

    def haproxy_says(self) -> str:
        return f"HAProxy: {self.server_states() if self.haproxy.poll() is None else 'exited'}; " \
               f"log: {_tail(self.haproxy_log, 1500)}"


def _start_haproxy(work: Path, replicas: list[Replica]) -> tuple[subprocess.Popen, str, str, Path]:
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")  # not on a user's PATH
    if binary is None:
        pytest.fail("`haproxy` is not installed: run `make setup-ops` (apt-get install -y haproxy), then rerun")
    listen, stats = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "LORAFLEET_LISTEN": listen, "LORAFLEET_STATS": stats,
           **{f"LORAFLEET_R{i + 1}": r.target for i, r in enumerate(replicas)}}
    log = work / "haproxy.log"
    with log.open("wb") as out:   # the shipped file itself; addresses come from the environment
        proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, listen, f"http://{stats}/stats;csv", log


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    keys_file = work / "keys.json"
    keys = {t: create_key(keys_file, t, admin=False) for t in TENANTS}
    replicas = []
    for i in range(3):
        port, mport = _free_port(), _free_port()
        argv = [*MODEL_FLAGS, "--cache-dir", str(tiny_model_dir.parent), "--data-dir", str(work / "data"),
                "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport),
                "--api-keys", str(keys_file), "--rescan-interval-s", str(RESCAN_S), "--metrics-per-tenant",
                "--threads", "1", "--max-batch-size", "4", "--max-context-tokens", "128",
                "--max-prompt-tokens", "64", "--max-new-tokens", "8", "--default-new-tokens", "4"]
        replicas.append(Replica(f"r{i + 1}", port, mport, argv, work / f"r{i + 1}.log"))
    haproxy = None
    fleet = None
    try:
        for r in replicas:
            r.start()
        haproxy, listen, stats_url, hlog = _start_haproxy(work, replicas)
        fleet = Fleet(replicas, listen, stats_url, keys, haproxy, hlog, work)
        for r in replicas:
            _wait(f"replica {r.name} to report SERVING", r.serving, START_S, lambda: _tail(r.log))
        _wait("HAProxy to see all 3 replicas UP",
              lambda: set(fleet.server_states().values()) == {"UP"}, START_S, fleet.haproxy_says)
        yield fleet
    finally:
        for c in fleet.clients if fleet else []:
            c.close()
        if haproxy is not None and haproxy.poll() is None:
            haproxy.terminate()
            haproxy.wait(10)
        for r in replicas:
            r.stop()


Counts = dict[str, dict[str, float]]   # replica name -> tenant -> calls finished OK


def _counts(fleet: Fleet) -> Counts:
    return {r.name: r.tenant_requests() for r in fleet.replicas if r.proc is not None and r.proc.poll() is None}


def _delta(before: Counts, tenant: str, fleet: Fleet) -> dict[str, float]:
    """replica name -> calls of `tenant` it finished since `before` (replicas with none left out)."""
    now = _counts(fleet)
    diff = {name: c.get(tenant, 0.0) - before.get(name, {}).get(tenant, 0.0) for name, c in now.items()}
    return {name: d for name, d in diff.items() if d > 0}


def test_a_each_tenant_lands_on_one_replica(fleet, capsys):
    before = _counts(fleet)
    for tenant in TENANTS:   # one call at a time: bounded load (hash-balance-factor) never spills
        c = fleet.client(tenant)
        for i in range(CALLS_PER_TENANT):
            assert c.generate(f"hello {i}", max_new_tokens=2).completion_tokens == 2
    homes = {t: _delta(before, t, fleet) for t in TENANTS}
    table = ["tenant  " + "  ".join(f"{r.name:>4}" for r in fleet.replicas)]
    table += [f"{t:<7} " + "  ".join(f"{homes[t].get(r.name, 0):>4.0f}" for r in fleet.replicas) for t in TENANTS]
    with capsys.disabled():
        print("\nper-replica affinity (Generate calls finished OK, from each replica's /metrics):\n"
              + "\n".join(table))
    for t in TENANTS:
        assert list(homes[t].values()) == [CALLS_PER_TENANT], f"{t} was spread over replicas: {homes[t]}"
    assert len({next(iter(h)) for h in homes.values()}) >= 2, f"every tenant hashed to one replica: {homes}"


def _usable(c: LoraFleetClient, adapter: str) -> bool:
    try:
        return c.generate("hi", adapter=adapter, max_new_tokens=2).completion_tokens == 2
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def _stored(fleet: Fleet, tenant: str, name: str) -> list[int]:
    """The versions on disk in the shared store: the ground truth every replica must serve."""
    name_dir = fleet.work / "data" / "adapters" / tenant / name
    return sorted(int(p.name[1:]) for p in name_dir.glob("v*")) if name_dir.is_dir() else []


def test_b_upload_through_the_proxy_is_usable_on_every_replica(fleet, tiny_model_dir, capsys):
    adapter_dir, _ = make_adapter(tiny_model_dir, fleet.work / "adapters", "lora", seed=11)
    info = fleet.client("acme").upload_adapter(adapter_dir, "summarize")
    key, t0 = f"summarize@{info.version}", time.monotonic()
    for r in fleet.replicas:
        c = fleet.client("acme", r.target)
        _wait(f"{key} to be usable on {r.name} (rescan every {RESCAN_S} s)", lambda: _usable(c, key), VISIBLE_S,
              lambda: _tail(r.log))
    with capsys.disabled():
        print(f"\nupload through the proxy usable on all 3 replicas after {time.monotonic() - t0:.2f} s")


def test_c_concurrent_uploads_through_two_replicas_get_distinct_versions(fleet, tiny_model_dir):
    adapter_dir, _ = make_adapter(tiny_model_dir, fleet.work / "adapters", "lora", seed=12)
    per_replica, start = 4, threading.Barrier(2 * 4)
    versions: list[int] = []
    errors: list[BaseException] = []

    def upload(target: str) -> None:
        c = fleet.client("beta", target)
        try:
            start.wait(30)
            versions.append(c.upload_adapter(adapter_dir, "busy").version)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(r.target,)) for r in fleet.replicas[:2]
               for _ in range(per_replica)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an upload hung"
    assert errors == [], errors
    n = 2 * per_replica
    assert sorted(versions) == list(range(1, n + 1)), f"versions handed out: {sorted(versions)}"
    assert _stored(fleet, "beta", "busy") == list(range(1, n + 1))
    for r in fleet.replicas:   # none lost: every replica serves each of them after its rescan
        c = fleet.client("beta", r.target)
        for v in range(1, n + 1):
            _wait(f"busy@{v} to be usable on {r.name}", lambda: _usable(c, f"busy@{v}"), VISIBLE_S,
                  lambda: _tail(r.log))


@dataclass
class Traffic:
    """Client threads with retries calling Generate through the proxy until stopped."""
    fleet: Fleet
    tenants: tuple[str, ...]
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, tenant: str) -> None:
        c = self.fleet.client(tenant, retries=6)
        while not self.stop.is_set():
            try:
                c.generate("steady traffic", max_new_tokens=2)
                self.ok += 1
            except grpc.RpcError as e:
                self.failures.append(f"{tenant}: {e.code().name} {e.details()}")

    def __enter__(self) -> "Traffic":
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True) for t in self.tenants]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)


def test_d_kill_9_a_replica_then_restart_it(fleet, capsys):
    before = _counts(fleet)
    for t in TENANTS:
        fleet.client(t).generate("where do you live", max_new_tokens=1)
    home = {t: next(iter(_delta(before, t, fleet))) for t in TENANTS}
    victim = next(r for r in fleet.replicas if r.name == home["acme"])
    its_tenants = tuple(t for t in TENANTS if home[t] == victim.name)
    with Traffic(fleet, TENANTS) as traffic:
        _wait("traffic to flow", lambda: traffic.ok >= 2 * len(TENANTS), VISIBLE_S, fleet.haproxy_says)
        victim.kill9()
        _wait(f"HAProxy to mark {victim.name} DOWN", lambda: fleet.server_states()[victim.name].startswith("DOWN"),
              DOWN_S, fleet.haproxy_says)
        at_down, ok_at_down = _counts(fleet), traffic.ok
        _wait("calls to succeed after the replica went DOWN", lambda: traffic.ok >= ok_at_down + 3 * len(TENANTS),
              VISIBLE_S, lambda: f"{traffic.failures[-5:]} {fleet.haproxy_says()}")
    moved = {t: sum(_delta(at_down, t, fleet).values()) for t in its_tenants}
    with capsys.disabled():
        print(f"\nkill -9 {victim.name} (home of {', '.join(its_tenants)}): {traffic.ok} calls OK, "
              f"{len(traffic.failures)} failed {traffic.failures}; calls of its tenants served by the other "
              f"replicas after it went DOWN: {moved}")
    assert len(traffic.failures) <= len(its_tenants), f"more failures than calls in flight: {traffic.failures}"
    assert all(m > 0 for m in moved.values()), f"{victim.name}'s tenants were not served elsewhere: {moved}"

    victim.start()
    _wait(f"{victim.name} to serve again after restart", victim.serving, START_S, lambda: _tail(victim.log))
    _wait(f"HAProxy to mark {victim.name} UP", lambda: fleet.server_states()[victim.name] == "UP", DOWN_S,
          fleet.haproxy_says)
    for tenant, name in (("acme", "summarize"), ("beta", "busy")):
        stored = _stored(fleet, tenant, name)
        c = fleet.client(tenant, victim.target)
        assert stored and c.get_adapter(name).version == stored[-1]
        for v in stored:
            assert _usable(c, f"{name}@{v}"), f"{victim.name} does not serve {tenant}/{name}@{v} after restart"
    before = _counts(fleet)
    fleet.client("acme").generate("back home", max_new_tokens=1)
    assert _delta(before, "acme", fleet) == {victim.name: 1.0}, "acme did not return to its replica"
