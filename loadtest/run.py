"""`make loadtest`: start a server with a fleet of tenants, run locust headless, print a summary.

    python loadtest/run.py                       # default model, 100 tenants, all scenarios, 16 users, 60 s
    python loadtest/run.py --duration 30 --scenario mixed --users 32
    python loadtest/run.py --tenants 0           # no keys, no adapters: the base model only
    python loadtest/run.py --server-args '--adapter-slots 8' -- --zipf-s 0.8 --strict
    python loadtest/run.py --target 127.0.0.1:50051 -- --adapters tenants.txt --http-target 127.0.0.1:8000
                                                 # a running server (gRPC, and its HTTP door for OpenAIUser)

Unless --target is given, it writes a keys file for --tenants tenants (t000, t001, ...), starts
`python -m server --api-keys ...`, uploads one LoRA adapter with a classification head per tenant,
and hands locust a `tenant key adapter` file; tenants are drawn zipf-popular from it.

Options after `--` (or any this script does not know) go to locust / loadtest/locustfile.py.
Locust's CSV and HTML reports, and the server and locust logs, land in loadtest/reports/.
Exit status: 0 when no call failed, 1 when some did, 2 when the run itself broke.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
REPORTS = ROOT / "loadtest" / "reports"
SCENARIOS = {
    "zipf": ["ZipfTenantsUser"],
    "mixed": ["MixedUser"],
    "churn": ["ZipfTenantsUser", "UploadChurnUser"],
    "http": ["OpenAIUser"],
    "all": ["ZipfTenantsUser", "MixedUser", "UploadChurnUser", "OpenAIUser"],
}
GENERATION = ("Generate", "GenerateStream", "Completions", "CompletionsStream", "ChatCompletions",
              "ChatCompletionsStream")


@dataclass(frozen=True)
class Row:
    """One line of locust's <prefix>_stats.csv; times in ms, `size` = mean response_length."""
    name: str
    count: int
    failures: int
    rps: float
    size: float
    p50: float
    p95: float
    p99: float


@dataclass
class Summary:
    rows: dict[str, Row]
    failures_by_code: dict[str, int]
    tolerated: dict[str, int] = field(default_factory=dict)     # "Classify [UNIMPLEMENTED]" -> count
    server_tokens: float | None = None

    @property
    def calls(self) -> list[Row]:
        """Rows that are calls (not ttft:* events, not answers counted apart)."""
        return [r for n, r in self.rows.items() if not n.startswith("ttft:") and "[" not in n]

    @property
    def requests_per_s(self) -> float:
        return sum(r.rps for r in self.calls) + sum(r.rps for n, r in self.rows.items() if "[" in n)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.rps * r.size for r in self.calls if r.name in GENERATION)

    @property
    def failures(self) -> int:
        return sum(self.failures_by_code.values())

    def render(self, duration_s: float) -> str:
        out = ["", f"{'call':<34}{'count':>8}{'fail':>6}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"]
        for r in self.rows.values():
            out.append(f"{r.name:<34}{r.count:>8}{r.failures:>6}{r.rps:>8.1f}{_ms(r.p50)}{_ms(r.p95)}{_ms(r.p99)}")
        out.append("")
        calls = sum(r.count for r in self.calls) + sum(self.tolerated.values())
        out.append(f"requests/s      {self.requests_per_s:.1f}  ({calls} calls, {self.failures} failed)")
        server = ""
        if self.server_tokens is not None:
            server = f"; the server counted {self.server_tokens:.0f} = {self.server_tokens / duration_s:.0f}/s"
        out.append(f"tokens/s        {self.tokens_per_s:.0f}  (generated, as the clients received them{server})")
        for name in GENERATION:
            if name in self.rows:
                r = self.rows[name]
                out.append(f"latency         {name:<15} {_pcts(r)}")
        for name in (n for n in self.rows if n.startswith("ttft:")):
            r = self.rows[name]
            out.append(f"first token     {name[5:]:<15} {_pcts(r)}")
        codes = ", ".join(f"{c} {n}" for c, n in sorted(self.failures_by_code.items())) or "none"
        out.append(f"failures        {codes}")
        if self.tolerated:
            apart = ", ".join(f"{n} {c}" for n, c in sorted(self.tolerated.items()))
            out.append(f"not failures    {apart}  (not available yet; --strict counts them as failures)")
        return "\n".join(out)


def _ms(v: float) -> str:
    return f"{'-':>9}" if math.isnan(v) else f"{v:>9.0f}"


def _pcts(r: Row) -> str:
    return "  ".join(f"{p} {'-' if math.isnan(v) else f'{v:.0f}'} ms" for p, v in
                     (("p50", r.p50), ("p95", r.p95), ("p99", r.p99)))


def _num(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def read_summary(prefix: Path) -> Summary:
    """Parse locust's <prefix>_stats.csv and <prefix>_failures.csv."""
    rows: dict[str, Row] = {}
    with open(f"{prefix}_stats.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["Name"] == "Aggregated":
                continue
            rows[r["Name"]] = Row(r["Name"], int(r["Request Count"]), int(r["Failure Count"]),
                                  _num(r["Requests/s"]), _num(r["Average Content Size"]),
                                  _num(r["50%"]), _num(r["95%"]), _num(r["99%"]))
    by_code: dict[str, int] = {}
    with open(f"{prefix}_failures.csv", newline="") as f:
        for r in csv.DictReader(f):
            m = re.match(r"([A-Z_]+):", r["Error"])
            code = m.group(1) if m else "OTHER"
            by_code[code] = by_code.get(code, 0) + int(r["Occurrences"])
    tolerated = {n: r.count for n, r in rows.items() if "[" in n}
    return Summary(rows, by_code, tolerated)


def run_locust(target: str, classes: list[str], users: int, spawn_rate: float, duration_s: float,
               prefix: Path, extra: list[str] = (), html: bool = True) -> subprocess.CompletedProcess:
    """Run locust headless (a subprocess: it monkey-patches the process with gevent); output in <prefix>_locust.log."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration_s:g}s", "--stop-timeout", "10",
           "--host", target, "--csv", str(prefix), *([f"--html={prefix}.html"] if html else []),
           *extra, *classes]
    log = Path(f"{prefix}_locust.log")
    with log.open("wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=duration_s + 120)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def start_server(server_args: list[str], log: Path,
                 timeout_s: float = 600.0) -> tuple[subprocess.Popen, str, str, str]:
    """`python -m server --port 0 --metrics-port 0 --http-port 0 ...`; returns (process, grpc target,
    metrics url, HTTP door host:port)."""
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                             *server_args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    target = metrics = http = None
    while time.monotonic() < deadline and not (target and metrics and http):
        if proc.poll() is not None:
            raise SystemExit(f"loadtest: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        text = log.read_text(errors="replace")
        if m := re.search(r"lorafleet: serving .* on (\S+):(\d+)\s*$", text, re.M):
            target = f"{m.group(1)}:{m.group(2)}"
        if m := re.search(r"metrics on (http://\S+/metrics)", text):
            metrics = m.group(1)
        if m := re.search(r"OpenAI-compatible HTTP on http://(\S+)/v1", text):
            http = m.group(1)
        time.sleep(0.2)
    if not target:
        proc.kill()
        raise SystemExit(f"loadtest: the server did not start within {timeout_s:g}s; see {log}")
    return proc, target, metrics or "", http or ""


def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"loadtest: {target} is not SERVING after {timeout_s:g}s")
            time.sleep(0.2)


SERVER_COUNTERS = ("lorafleet_generated_tokens_total", "lorafleet_adapter_cache_hits_total",
                   "lorafleet_adapter_cache_misses_total", "lorafleet_adapter_evictions_total")


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """{(sample name, tier or ""): value} of the server counters the summary reports."""
    if not metrics_url:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as r:  # noqa: S310 - our own server
        text = r.read().decode()
    return {(s.name, s.labels.get("tier", "")): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name in SERVER_COUNTERS}


def server_lines(before: dict, after: dict) -> tuple[float | None, list[str]]:
    """(generated tokens, summary lines on the adapter cache) from two scrapes."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = d.get(("lorafleet_generated_tokens_total", ""))
    lines = []
    for tier in ("device", "host"):
        hits = d.get(("lorafleet_adapter_cache_hits_total", tier), 0.0)
        misses = d.get(("lorafleet_adapter_cache_misses_total", tier), 0.0)
        if hits + misses:
            lines.append(f"adapter cache   {tier:<6} hit rate {hits / (hits + misses):.1%} ({misses:.0f} loads, "
                         f"{d.get(('lorafleet_adapter_evictions_total', tier), 0.0):.0f} evictions; server metrics)")
    return tokens, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--users", type=int, default=16, help="concurrent locust users")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="all",
                   help="zipf: tenants by zipf popularity; mixed: generate/stream/classify; "
                        "churn: zipf traffic plus adapter uploads; http: the OpenAI-compatible HTTP door; "
                        "all: every user class")
    p.add_argument("--tenants", type=int, default=100,
                   help="tenants to provision, one adapter each (0 = no keys, base model only)")
    p.add_argument("--adapter-rank", type=int, default=8, help="LoRA rank of the provisioned adapters")
    p.add_argument("--target", default="", help="host:port of a running server (default: start one)")
    p.add_argument("--server-args", default="", help="flags for the server this script starts (one string)")
    p.add_argument("--reports", type=Path, default=REPORTS, help="where CSV/HTML reports and logs go")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]

    stamp = f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.reports / stamp
    args.reports.mkdir(parents=True, exist_ok=True)
    server, metrics_url, target, fleet, data_dir = None, "", args.target, "base model, no keys", None
    if not target:
        server_args = shlex.split(args.server_args)
        tenant_keys = []
        if not any(a.startswith("--data-dir") for a in server_args):
            data_dir = tempfile.mkdtemp(prefix="lorafleet-loadtest-")   # the fleet's adapters, removed after
            server_args += ["--data-dir", data_dir]
        if args.tenants > 0:
            from loadtest.fleet import create_keys
            keys = Path(f"{out}_keys.json")
            tenant_keys = create_keys(keys, args.tenants)
            server_args += ["--api-keys", str(keys)]
        print("loadtest: starting the server (the first start builds the default model) ...", flush=True)
        server, target, metrics_url, http_target = start_server(server_args, Path(f"{out}_server.log"))
        extra = ["--http-target", http_target, *extra]
    try:
        wait_serving(target)
        if server is not None and tenant_keys:
            from loadtest.fleet import upload_adapters
            from loadtest.traffic import write_adapters_file
            t0 = time.monotonic()
            tenants = upload_adapters(target, tenant_keys, rank=args.adapter_rank)
            write_adapters_file(Path(f"{out}_tenants.txt"), tenants)
            extra = ["--adapters", f"{out}_tenants.txt", *extra]
            fleet = f"{len(tenants)} tenants with an adapter each, uploaded in {time.monotonic() - t0:.1f}s"
        before = scrape(metrics_url)
        print(f"loadtest: {args.scenario} ({', '.join(SCENARIOS[args.scenario])}), {args.users} users, "
              f"{args.duration:g}s against {target}; {fleet}", flush=True)
        t0 = time.monotonic()
        proc = run_locust(target, SCENARIOS[args.scenario], args.users, args.spawn_rate, args.duration, out, extra)
        elapsed = time.monotonic() - t0
        if proc.returncode not in (0, 1) or not Path(f"{out}_stats.csv").exists():
            print(Path(proc.log).read_text()[-4000:], file=sys.stderr)
            print(f"loadtest: locust exited with {proc.returncode}", file=sys.stderr)
            return 2
        summary = read_summary(out)
        summary.server_tokens, cache_lines = server_lines(before, scrape(metrics_url))
        print(summary.render(min(elapsed, args.duration)))
        for line in cache_lines:
            print(line)
        print(f"reports         {out}_stats.csv, _failures.csv, .html, _locust.log")
        return 1 if summary.failures else 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
