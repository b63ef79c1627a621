"""A real Prometheus scrapes a real server, on its metrics port and on the HTTP door's /metrics (with
an admin key as a bearer token): the series exist, with plausible values, vLLM's names answer vLLM
dashboards' queries, and our names lint clean.

Needs the `prometheus` binary (and `promtool`, shipped with it): `make setup-ops` installs them.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import LoraFleetClient
from server.api.auth import create_key
from server.main import BackgroundServer
from tests.integration.conftest import make_config

N_GENERATE, N_STREAM = 6, 3
WAIT_S = 30.0
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "lorafleet-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: run `make setup-ops` (apt-get install -y prometheus), "
                    f"then rerun the tests")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return r.read()


def _sample(exposition: str, name: str, labels: dict[str, str] | None = None) -> float:
    for fam in text_string_to_metric_families(exposition):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return 0.0


def _query(prom: str, expr: str) -> float | None:
    """The value of an instant query with one result, or None while it has none."""
    body = json.loads(_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _start_prometheus(binary: str, workdir: Path, metrics_port: int, http_port: int | None = None,
                      key: str = "") -> tuple[subprocess.Popen, str, Path]:
    """Scrapes job lorafleet (the metrics port) and, given `http_port`, job lorafleet-http (the HTTP
    door's /metrics, sending `key` as a bearer token)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    http_job = (f"  - job_name: lorafleet-http\n    metrics_path: /metrics\n"
                f"    authorization: {{type: Bearer, credentials: '{key}'}}\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n") if http_port else ""
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: lorafleet\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n" + http_job)
    port = _free_port()
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def _wait_ready(proc: subprocess.Popen, prom: str, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"{prom}/-/ready", timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"prometheus not ready after {WAIT_S:g}s:\n{log.read_text()[-3000:]}")


def test_prometheus_scrapes_the_server(tiny_loaded, tmp_path):
    prometheus = _binary("prometheus")
    keys_file = tmp_path / "keys.json"
    key = create_key(keys_file, "ops", True)
    cfg = make_config(tmp_path, api_keys=keys_file, http_port=0)
    with BackgroundServer(cfg, tiny_loaded) as running:
        metrics_url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        before = _get(metrics_url).decode()
        # (series, labels, increase this test causes); the registry is per process and other tests'
        # calls are already counted, so the wanted value is the count before plus the increase
        expect = [
            ("lorafleet_requests_total", {"method": "Generate", "code": "OK"}, N_GENERATE),
            ("lorafleet_requests_total", {"method": "GenerateStream", "code": "OK"}, N_STREAM),
            ("lorafleet_time_to_first_token_seconds_count", {}, N_GENERATE + N_STREAM),
            ("lorafleet_e2e_request_latency_seconds_count", {}, N_GENERATE + N_STREAM),
            ("lorafleet_generated_tokens_total", {}, 4 * N_GENERATE + 3 * N_STREAM),
            ("lorafleet_finished_requests_total", {"reason": "length"}, N_GENERATE + N_STREAM),
            ("lorafleet_inter_token_latency_seconds_count", {}, 3 * N_GENERATE + 2 * N_STREAM),
            ("lorafleet_request_prefill_time_seconds_count", {}, N_GENERATE + N_STREAM),
            ("lorafleet_request_decode_time_seconds_count", {}, N_GENERATE + N_STREAM),
            ("lorafleet_request_generation_tokens_sum", {}, 4 * N_GENERATE + 3 * N_STREAM),
            ("lorafleet_request_generation_tokens_bucket", {"le": "5.0"}, N_GENERATE + N_STREAM),
            # pre-created label sets are exported before their first event
            ("lorafleet_adapter_uploads_total", {"outcome": "quota"}, 0),
            ("lorafleet_adapter_cache_hits_total", {"tier": "device"}, 0),
        ]
        model = f'model_name="{tiny_loaded.name}"'
        # vLLM's names, scraped from the HTTP door: the same values under vLLM's labels
        expect_vllm = [
            ("vllm:request_success_total", {"finished_reason": "length"}, N_GENERATE + N_STREAM),
            ("vllm:time_to_first_token_seconds_count", {}, N_GENERATE + N_STREAM),
            ("vllm:inter_token_latency_seconds_count", {}, 3 * N_GENERATE + 2 * N_STREAM),
            ("vllm:generation_tokens_total", {}, 4 * N_GENERATE + 3 * N_STREAM),
            ("vllm:request_generation_tokens_count", {}, N_GENERATE + N_STREAM),
            ("vllm:num_requests_running", {}, 0),
        ]
        want = {'up{job="lorafleet"}': 1.0, 'up{job="lorafleet-http"}': 1.0}
        for job, rows in (("lorafleet", expect), ("lorafleet-http", expect_vllm)):
            for name, labels, delta in rows:
                sel = ",".join([f'job="{job}"'] + ([model] if job != "lorafleet" else [])
                               + [f'{k}="{v}"' for k, v in labels.items()])
                want[f"{name}{{{sel}}}"] = _sample(before, name, labels) + delta

        proc, prom, log = _start_prometheus(prometheus, tmp_path / "prom", running.metrics_port, running.http_port,
                                            key)
        try:
            _wait_ready(proc, prom, log)
            # a scrape of each job before the traffic, so that rate() sees the increase
            deadline = time.monotonic() + WAIT_S
            while not all(_query(prom, f'up{{job="{job}"}}') == 1.0 for job in ("lorafleet", "lorafleet-http")):
                assert time.monotonic() < deadline, \
                    f"no scrape of both jobs within {WAIT_S:g}s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            with LoraFleetClient(f"127.0.0.1:{running.port}", api_key=key, timeout=60) as c:
                for i in range(N_GENERATE):
                    assert c.generate(f"scrape me {i}", max_new_tokens=4, ignore_eos=True).completion_tokens == 4
                for i in range(N_STREAM):
                    assert list(c.generate_stream(f"stream {i}", max_new_tokens=3, ignore_eos=True))
            got: dict[str, float | None] = {}
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                got = {expr: _query(prom, expr) for expr in want}
                if all(v is not None and v >= want[e] for e, v in got.items()):
                    break
                time.sleep(0.5)
            missing = {e: (got.get(e), f">= {w}") for e, w in want.items()
                       if got.get(e) is None or got[e] < w}
            assert not missing, f"after {WAIT_S:g}s Prometheus has (got, want): {missing}"
            # a latency histogram whose values make sense: p50 TTFT well under a minute
            p50 = _query(prom, 'histogram_quantile(0.5, lorafleet_time_to_first_token_seconds_bucket{job="lorafleet"})')
            assert p50 is not None and 0 < p50 < 60, p50
            # a vLLM dashboard's query, as written for vLLM
            vllm_p50 = None
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                vllm_p50 = _query(prom, "histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_"
                                        f'seconds_bucket{{job="lorafleet-http",{model}}}[1m])))')
                if vllm_p50 is not None and vllm_p50 == vllm_p50:          # not NaN: the rate saw traffic
                    break
                time.sleep(0.5)
            assert vllm_p50 is not None and 0 < vllm_p50 < 60, vllm_p50
            _check_dashboard(prom, before)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _assert_defined(expr: str, exposition: str, where: str) -> None:
    families = {f.name for f in text_string_to_metric_families(exposition)}
    for name in re.findall(r"lorafleet_[a-z0-9_]+", expr):
        base = re.sub(r"_(total|bucket|sum|count|created)$", "", name)
        assert base in families, f"{where} uses {name}, which server/metrics.py does not define: {expr}"


def _check_dashboard(prom: str, exposition: str) -> None:
    """Every Grafana query is valid PromQL (Prometheus parses it) over metrics the server defines."""
    queries = _dashboard_queries()
    assert len(queries) >= 20
    for expr in queries:
        _assert_defined(expr, exposition, "the Grafana dashboard")
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        try:
            _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": concrete}))
        except urllib.error.HTTPError as e:  # 400 with the parse error for invalid PromQL
            pytest.fail(f"dashboard query rejected by Prometheus: {expr}\n{e.read().decode()[:500]}")


def test_exposition_and_alert_rules_pass_promtool(server):
    promtool = _binary("promtool")
    with LoraFleetClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        c.generate("lint me", max_new_tokens=2)
    text = _get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert b"lorafleet_requests_total" in text and b"vllm:e2e_request_latency_seconds_count" in text
    # our names lint clean
    ours = b"\n".join(line for line in text.splitlines()
                      if not line.startswith((b"vllm:", b"# HELP vllm:", b"# TYPE vllm:"))) + b"\n"
    r = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, timeout=30)
    assert r.returncode == 0, f"promtool check metrics failed:\n{r.stdout.decode()}{r.stderr.decode()}"
    # vLLM's names parse, and the lint's only complaints are about vLLM's own naming (the colon)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    problems = [p for p in (r.stdout + r.stderr).decode().splitlines() if p.strip()]
    assert problems and all(p.startswith("vllm:") for p in problems), problems
    assert any("should not contain ':'" in p for p in problems), problems
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, timeout=30)
    assert r.returncode == 0, f"promtool check rules failed:\n{r.stdout.decode()}{r.stderr.decode()}"
    for line in ALERTS.read_text().splitlines():
        _assert_defined(line, text.decode(), str(ALERTS.name))
