"""`python loadtest/soak.py --minutes N`: issue 20's soak. Mixed traffic of several tenants against a
fresh server from threads, then the checks that no call hurt the server or another tenant.

    python loadtest/soak.py --seconds 60                   # the tiny model (default), 8 + 2 threads
    python loadtest/soak.py --minutes 30 --model ''        # the default model (SmolLM2-135M-Instruct)
    python loadtest/soak.py --minutes 5 --threads 16 --server-args '--max-batch-size 8' --extremes

It writes keys for --tenants tenants (t000, ...), starts `python -m server` (loadtest/run.py's
start_server: gRPC, /metrics and the HTTP door on port 0) on a temporary data dir, uploads each
tenant's adapters (torch-free LoRA archives from loadtest/traffic.py, with a classification head),
and runs for the duration:
  --threads workers: Generate, GenerateStream, chat (gRPC, unary and streamed), Classify, HTTP
      /v1/completions and /v1/chat/completions (streamed and not), client cancels (a stream cancelled
      or a connection closed after the first token), short deadlines, and hostile requests (fields
      out of range, unknown adapters, wrong JSON types); --extremes adds in-range extremes
      (temperature 1e-38, lone surrogates, deep nesting) that must not hurt either
  --churn threads: uploads, hot swaps (a new version of `hot`, which workers also call) and deletes
Every call's status is counted against what that call may answer. The tiny model gets the tiny
test chat template (`<s>role\\ntext</s>`), so chat is served.

Checks (exit status 0 only when every one holds; 1 when one fails; 2 when the run itself broke):
  server errors        no INTERNAL / UNKNOWN / DATA_LOSS, no HTTP 5xx, no stream cut without [DONE]
  unexpected statuses  no call answered outside what it may (a valid Generate: OK only, ...)
  uploads lost         every upload answered OK is listed (ListAdapters) and usable (Generate
                       name@version) at the end, unless this soak deleted it
  gauges drained       lorafleet_running_requests and lorafleet_waiting_requests read 0 on the real
                       /metrics within --drain-s after the traffic stops
  health               gRPC health SERVING at the end, the server process alive
  server log clean     no ERROR line and no traceback in the server's log (its SIGTERM drain included)
RSS of the server process (/proc) before and after the traffic is reported; --max-rss-growth-mib
makes its growth a check too. The report (and --json FILE) lands beside the server log in --reports.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from loadtest.fleet import create_keys  # noqa: E402
from loadtest.run import REPORTS, start_server, wait_serving  # noqa: E402
from loadtest.traffic import HTTP_CODES, LABELS, lora_archive, prompt, upload_messages  # noqa: E402
from lorafleet.v1 import lorafleet_pb2 as pb  # noqa: E402
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc  # noqa: E402

SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "CUT_STREAM"}
CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
GAUGES = ("lorafleet_running_requests", "lorafleet_waiting_requests")
# the error event of an SSE stream -> our status names (server/http/openai.py, ERRORS)
STREAM_ERRORS = {"invalid_request_error": "INVALID_ARGUMENT", "not_found_error": "NOT_FOUND",
                 "rate_limit_error": "RESOURCE_EXHAUSTED", "timeout_error": "DEADLINE_EXCEEDED",
                 "service_unavailable_error": "UNAVAILABLE", "server_error": "INTERNAL"}
# the tiny chat template of tests/integration/conftest.py (the tiny model's <s> </s> mark turns)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                      "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                      "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
HOT, STABLE = "hot", "a0"        # the hot-swapped name; the name every tenant keeps
MAX_HOT_VERSIONS = 6             # then the churn deletes `hot` and starts it again


# ---------------------------------------------------------------- bookkeeping
@dataclass
class Tally:
    """Calls by (call, status), and those whose status the call may not answer."""
    calls: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)        # (call, status) -> one detail, for the report
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: str, status: str, allowed: set[str], detail: str = "") -> None:
        with self.lock:
            self.calls[(call, status)] += 1
            if status not in allowed:
                self.unexpected[(call, status)] += 1
                self.examples.setdefault((call, status), detail[:200])


@dataclass
class Ledger:
    """Every upload answered OK: (tenant, name) -> versions, minus what this soak deleted."""
    acked: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, tenant: str, name: str, version: int) -> None:
        with self.lock:
            self.acked.setdefault((tenant, name), set()).add(version)

    def deleted(self, tenant: str, name: str) -> None:
        with self.lock:
            self.acked.pop((tenant, name), None)

    def versions(self, tenant: str, name: str) -> set[int]:
        with self.lock:
            return set(self.acked.get((tenant, name), ()))


@dataclass
class Fleet:
    target: str                     # gRPC host:port
    http: str                       # http://host:port of the OpenAI door
    base: str                       # the base model's name on the HTTP door
    tenants: list[tuple[str, str]]  # (tenant, key)
    hidden: int
    layers: int


def md(key: str, tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), ("x-tenant", tenant))


def upload(adapters: pb_grpc.AdaptersStub, tenant: tuple[str, str], name: str, archive: bytes,
           tally: Tally, ledger: Ledger) -> None:
    try:
        info = adapters.UploadAdapter(upload_messages(name, archive), metadata=md(tenant[1], tenant[0]), timeout=60)
    except grpc.RpcError as e:
        tally.add("UploadAdapter", e.code().name, {"OK"}, e.details() or "")
        return
    ledger.ack(tenant[0], name, info.version)
    tally.add("UploadAdapter", "OK", {"OK"})


# ---------------------------------------------------------------- traffic
class Worker:
    """One thread of mixed traffic: its own channel, HTTP client and seeded rng."""

    def __init__(self, fleet: Fleet, opts, tally: Tally, seed: int):
        self.f, self.opts, self.tally = fleet, opts, tally
        self.rng = random.Random(seed)
        self.channel = grpc.insecure_channel(fleet.target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.http = httpx.Client(base_url=fleet.http, timeout=opts.request_timeout)
        self.actions: list[tuple[Callable[[], None], int]] = [
            (self.generate, 5), (self.generate_stream, 4), (self.chat, 2), (self.classify, 2),
            (self.http_completion, 3), (self.http_chat, 2), (self.cancel, 1), (self.short_deadline, 1),
            (self.hostile, 1)]

    def run(self, stop_at: float) -> None:
        fns, weights = zip(*self.actions)
        try:
            while time.monotonic() < stop_at:
                fn = self.rng.choices(fns, weights)[0]
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - an answer this client cannot read is a finding
                    self.tally.add(f"{fn.__name__} (unreadable answer)", type(e).__name__, set(), str(e))
        finally:
            self.http.close()
            self.channel.close()

    # -- what a call sends
    def tenant(self) -> tuple[str, str]:
        return self.rng.choice(self.f.tenants)

    def adapter(self) -> str:
        """Mostly the tenant's stable adapter; sometimes the base model, a pinned version, or `hot`
        (which the churn swaps and deletes: NOT_FOUND is then a fair answer)."""
        return self.rng.choices([STABLE, "", f"{STABLE}@1", HOT], [6, 2, 1, 2])[0]

    def params(self, max_new: int | None = None) -> pb.SamplingParams:
        r = self.rng
        return pb.SamplingParams(max_new_tokens=max_new or r.randint(1, self.opts.max_new_tokens),
                                 temperature=r.choice([0.0, 0.7, 1.0]), top_p=r.choice([0.0, 0.9]),
                                 top_k=r.choice([0, 40]), seed=r.getrandbits(32),
                                 repetition_penalty=r.choice([0.0, 1.2]), ignore_eos=r.random() < 0.5)

    def messages(self) -> list[pb.ChatMessage]:
        return [pb.ChatMessage(role="system", content="be brief"),
                pb.ChatMessage(role="user", content=prompt(self.rng, self.opts.prompt_chars))]

    def grpc_call(self, name: str, call: Callable[[], object], allowed: set[str]) -> None:
        try:
            call()
            self.tally.add(name, "OK", allowed)
        except grpc.RpcError as e:
            self.tally.add(name, e.code().name, allowed, e.details() or "")

    @staticmethod
    def allowed(adapter: str) -> set[str]:
        return {"OK", "NOT_FOUND"} if adapter.startswith(HOT) else {"OK"}

    # -- the actions
    def generate(self) -> None:
        t, a = self.tenant(), self.adapter()
        req = pb.GenerateRequest(prompt=prompt(self.rng, self.opts.prompt_chars), adapter=a, params=self.params())
        self.grpc_call("Generate", lambda: self.inference.Generate(req, metadata=md(t[1], t[0]),
                                                                    timeout=self.opts.request_timeout), self.allowed(a))

    def generate_stream(self) -> None:
        t, a = self.tenant(), self.adapter()
        req = pb.GenerateRequest(prompt=prompt(self.rng, self.opts.prompt_chars), adapter=a, params=self.params())
        self.grpc_call("GenerateStream", lambda: list(self.inference.GenerateStream(
            req, metadata=md(t[1], t[0]), timeout=self.opts.request_timeout)), self.allowed(a))

    def chat(self) -> None:
        t, a = self.tenant(), self.adapter()
        req = pb.GenerateRequest(messages=self.messages(), adapter=a, params=self.params())
        kw = dict(metadata=md(t[1], t[0]), timeout=self.opts.request_timeout)
        if self.rng.random() < 0.5:
            self.grpc_call("Generate (chat)", lambda: self.inference.Generate(req, **kw), self.allowed(a))
        else:
            self.grpc_call("GenerateStream (chat)", lambda: list(self.inference.GenerateStream(req, **kw)),
                           self.allowed(a))

    def classify(self) -> None:
        t = self.tenant()
        req = pb.ClassifyRequest(texts=[prompt(self.rng, 64) for _ in range(self.rng.randint(1, 4))], adapter=STABLE)
        self.grpc_call("Classify", lambda: self.inference.Classify(req, metadata=md(t[1], t[0]),
                                                                    timeout=self.opts.request_timeout), {"OK"})

    def http_body(self, adapter: str) -> dict:
        p = self.params()
        return {"model": adapter or self.f.base, "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                "seed": p.seed, "ignore_eos": p.ignore_eos, **({"top_p": p.top_p} if p.top_p else {})}

    def http_completion(self) -> None:
        a = self.adapter()
        body = {**self.http_body(a), "prompt": prompt(self.rng, self.opts.prompt_chars)}
        self.post("/v1/completions", "Completions", body, self.allowed(a))

    def http_chat(self) -> None:
        a = self.adapter()
        body = {**self.http_body(a), "messages": [{"role": "user", "content": prompt(self.rng, self.opts.prompt_chars)}]}
        self.post("/v1/chat/completions", "ChatCompletions", body, self.allowed(a))

    def post(self, path: str, name: str, body: dict | bytes, allowed: set[str], stream: bool | None = None,
             close_after_first: bool = False, label: str = "") -> None:
        """One HTTP call: streamed half the time unless `stream` says; counted as `name`[Stream] (label)."""
        stream = self.rng.random() < 0.5 if stream is None else stream
        if isinstance(body, dict):
            body = json.dumps({**body, "stream": stream}).encode()
        name += ("Stream" if stream else "") + (f" ({label})" if label else "")
        t = self.tenant()
        headers = {"authorization": f"Bearer {t[1]}", "x-tenant": t[0], "content-type": "application/json"}
        try:
            with self.http.stream("POST", path, content=body, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    self.tally.add(name, HTTP_CODES.get(r.status_code, f"HTTP_{r.status_code}"), allowed, r.text)
                    return
                status, detail = "OK", ""
                if r.headers.get("content-type", "").startswith("text/event-stream"):
                    status, detail = sse_status(r, close_after_first)
                else:
                    r.read()
                self.tally.add(name, status, allowed, detail)
        except httpx.HTTPError as e:
            self.tally.add(name, f"HTTP {type(e).__name__}", allowed, str(e))

    def cancel(self) -> None:
        """A client that goes away after its first token (gRPC cancel, or an HTTP connection closed)."""
        t = self.tenant()
        req = pb.GenerateRequest(prompt=prompt(self.rng, self.opts.prompt_chars), adapter=STABLE,
                                 params=pb.SamplingParams(max_new_tokens=self.opts.max_new_tokens, ignore_eos=True))
        if self.rng.random() < 0.5:
            self.post("/v1/completions", "Completions",
                      {"model": STABLE, "prompt": req.prompt, "max_tokens": self.opts.max_new_tokens,
                       "ignore_eos": True}, {"OK", "CLOSED"}, stream=True, close_after_first=True, label="closed")
            return

        def cancelled() -> None:
            call = self.inference.GenerateStream(req, metadata=md(t[1], t[0]), timeout=self.opts.request_timeout)
            next(call)
            call.cancel()
            list(call)                              # raises CANCELLED
        self.grpc_call("GenerateStream (cancelled)", cancelled, {"OK", "CANCELLED"})

    def short_deadline(self) -> None:
        t = self.tenant()
        req = pb.GenerateRequest(prompt=prompt(self.rng, self.opts.prompt_chars), adapter=STABLE,
                                 params=pb.SamplingParams(max_new_tokens=self.opts.max_new_tokens, ignore_eos=True))
        timeout = self.rng.uniform(0.001, 0.2)
        self.grpc_call("Generate (short deadline)", lambda: self.inference.Generate(
            req, metadata=md(t[1], t[0]), timeout=timeout), {"OK", "DEADLINE_EXCEEDED"})

    def hostile(self) -> None:
        """A request a client got wrong: refused with a client error, never more."""
        kinds = HOSTILE_GRPC + HOSTILE_HTTP + (EXTREMES_GRPC + EXTREMES_HTTP if self.opts.extremes else [])
        label, what = self.rng.choice(kinds)
        allowed = CLIENT_ERRORS | ({"OK"} if label.startswith("extreme") else set())
        t = self.tenant()
        if isinstance(what, pb.GenerateRequest):
            self.grpc_call(f"Generate ({label})", lambda: self.inference.Generate(
                what, metadata=md(t[1], t[0]), timeout=self.opts.request_timeout), allowed)
        else:
            path, body = what
            self.post(path, "ChatCompletions" if "chat" in path else "Completions",
                      body if isinstance(body, bytes) else {"model": self.f.base, **body}, allowed, stream=False,
                      label=label)


def sse_status(r: httpx.Response, close_after_first: bool) -> tuple[str, str]:
    """A 200 event stream's outcome: OK at [DONE], the error event's status, CLOSED when we hung up
    after the first event, CUT_STREAM when the server ended it without either."""
    for line in r.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return "OK", ""
        doc = json.loads(data)
        if "error" in doc:
            return STREAM_ERRORS.get(doc["error"].get("type"), "INTERNAL"), doc["error"].get("message", "")
        if close_after_first:
            return "CLOSED", ""
    return "CUT_STREAM", "the stream ended without [DONE] or an error event"


def _req(prompt_: str = "hello", adapter: str = "", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt_, adapter=adapter, params=pb.SamplingParams(**{"max_new_tokens": 4,
                                                                                           **params}))


HOSTILE_GRPC = [("temperature 1e9", _req(temperature=1e9)), ("top_k 10^6", _req(top_k=10**6)),
                ("max_new_tokens 10^6", _req(max_new_tokens=10**6)), ("empty prompt", _req("")),
                ("unknown adapter", _req(adapter="nobody-has-this")), ("path adapter", _req(adapter="../../etc")),
                ("empty stop", _req(stop=[""])), ("nan top_p", _req(top_p=float("nan"))),
                ("long request_id", pb.GenerateRequest(prompt="x", request_id="r" * 200))]
HOSTILE_HTTP = [("string temperature", ("/v1/completions", {"prompt": "x", "temperature": "hot"})),
                ("unknown field", ("/v1/completions", {"prompt": "x", "frobnicate": 1})),
                ("n 10^6", ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 10**6})),
                ("top_logprobs 1000", ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                "logprobs": True, "top_logprobs": 1000})),
                ("logit_bias not a token id", ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}})),
                ("content int", ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]})),
                ("max_tokens 0", ("/v1/completions", {"prompt": "x", "max_tokens": 0})),
                ("not json", ("/v1/completions", b"{")), ("array body", ("/v1/completions", b"[]"))]
EXTREMES_GRPC = [("extreme temperature 1e-38", _req(temperature=1e-38)),
                 ("extreme repetition_penalty 1e-38", _req(temperature=1.0, repetition_penalty=1e-38))]
EXTREMES_HTTP = [("extreme lone surrogate", ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 4})),
                 ("extreme temperature 1e-38", ("/v1/completions", {"prompt": "x", "temperature": 1e-38})),
                 ("extreme n 4 logprobs 20", ("/v1/completions", {"prompt": "x", "n": 4, "logprobs": 20, "seed": 0,
                                                                 "max_tokens": 4})),
                 ("extreme penalties", ("/v1/completions", {"prompt": "x", "presence_penalty": -2,
                                                           "frequency_penalty": 2, "min_p": 1, "min_tokens": 4,
                                                           "logit_bias": {"5": 100, "6": -100}, "max_tokens": 4})),
                 ("extreme nesting", ("/v1/completions", b'{"prompt":' + b"[" * 5000 + b"]" * 5000 + b"}"))]


def churn(fleet: Fleet, tenants: list[tuple[str, str]], tally: Tally, ledger: Ledger, seed: int,
          stop_at: float) -> None:
    """Uploads, hot swaps and deletes for `tenants` (no other thread changes their adapters)."""
    rng = random.Random(seed)
    archives = [lora_archive(fleet.hidden, fleet.layers, rank=4, seed=seed * 100 + k, labels=LABELS) for k in range(4)]
    with grpc.insecure_channel(fleet.target) as ch:
        adapters = pb_grpc.AdaptersStub(ch)
        while time.monotonic() < stop_at:
            time.sleep(rng.uniform(0.2, 0.8))
            t = rng.choice(tenants)
            op = rng.choice(["swap", "swap", "tmp", "delete"])
            if op == "swap" and len(ledger.versions(t[0], HOT)) >= MAX_HOT_VERSIONS:
                delete(adapters, t, HOT, tally, ledger)
            elif op == "swap":
                upload(adapters, t, HOT, rng.choice(archives), tally, ledger)
            elif op == "tmp":
                upload(adapters, t, f"tmp-{rng.randint(0, 3)}", rng.choice(archives), tally, ledger)
            else:
                names = [f"tmp-{i}" for i in range(4) if ledger.versions(t[0], f"tmp-{i}")]
                if names:
                    delete(adapters, t, rng.choice(names), tally, ledger)


def delete(adapters: pb_grpc.AdaptersStub, t: tuple[str, str], name: str, tally: Tally, ledger: Ledger) -> None:
    try:
        adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), metadata=md(t[1], t[0]), timeout=60)
    except grpc.RpcError as e:
        tally.add("DeleteAdapter", e.code().name, {"OK"}, e.details() or "")
        return
    ledger.deleted(t[0], name)
    tally.add("DeleteAdapter", "OK", {"OK"})


# ---------------------------------------------------------------- checks
def prepare_model(spec: str, workdir: Path) -> str:
    """`tiny`: the tiny random model with the tiny chat template, built in `workdir`; else `spec`."""
    if spec != "tiny":
        return spec
    from server.model.default import resolve_model
    d = workdir / "tiny-chat"
    shutil.copytree(resolve_model("tiny", workdir / "models"), d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=TINY_CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    cfg_path.write_text(json.dumps(cfg))
    return str(d)


def log_errors(log: Path) -> list[str]:
    """The server log's ERROR lines and, for each traceback, its last line (the exception)."""
    out, lines = [], log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if " ERROR " in line:
            out.append(line.split(" ", 2)[-1][:200])            # without the timestamp
        elif line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            out.append("  " + (lines[j] if j < len(lines) else "(cut traceback)")[:200])
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def watch_rss(pid: int, threads: list[threading.Thread], warm_at: float, give_up_at: float) -> tuple[float, float]:
    """Wait for the traffic threads, sampling the server's RSS each second: (RSS at `warm_at`, peak)."""
    warm, peak = None, 0.0
    while any(t.is_alive() for t in threads) and time.monotonic() < give_up_at:
        time.sleep(1.0)
        rss = rss_mib(pid)
        peak = max(peak, rss)
        if warm is None and time.monotonic() >= warm_at:
            warm = rss
    return (rss_mib(pid) if warm is None else warm), peak


def gauges(metrics_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(metrics_url, timeout=5) as r:  # noqa: S310 - our own server
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in GAUGES}


def wait_drained(metrics_url: str, deadline_s: float) -> tuple[bool, dict[str, float], float]:
    t0 = time.monotonic()
    while True:
        g = gauges(metrics_url)
        if all(g.get(n, 0.0) == 0.0 for n in GAUGES):
            return True, g, time.monotonic() - t0
        if time.monotonic() - t0 > deadline_s:
            return False, g, time.monotonic() - t0
        time.sleep(0.1)


def lost_uploads(fleet: Fleet, ledger: Ledger) -> tuple[int, list[str]]:
    """(acknowledged versions checked, those not listed or not usable now)."""
    lost, checked = [], 0
    keys = dict(fleet.tenants)
    with grpc.insecure_channel(fleet.target) as ch:
        inference, adapters = pb_grpc.InferenceStub(ch), pb_grpc.AdaptersStub(ch)
        listed: dict[tuple[str, str], set[int]] = {}
        for tenant, key in fleet.tenants:
            token = ""
            while True:
                page = adapters.ListAdapters(pb.ListAdaptersRequest(page_size=100, page_token=token),
                                             metadata=md(key, tenant), timeout=60)
                for info in page.adapters:
                    listed[(tenant, info.name)] = set(info.versions)
                token = page.next_page_token
                if not token:
                    break
        for (tenant, name), versions in sorted(ledger.acked.items()):
            for v in sorted(versions):
                checked += 1
                if v not in listed.get((tenant, name), set()):
                    lost.append(f"{tenant}/{name}@{v}: not listed")
                    continue
                try:
                    inference.Generate(_req("still here?", f"{name}@{v}", max_new_tokens=1),
                                       metadata=md(keys[tenant], tenant), timeout=60)
                except grpc.RpcError as e:
                    lost.append(f"{tenant}/{name}@{v}: Generate answered {e.code().name}: {e.details()}")
    return checked, lost


def health(target: str) -> str:
    with grpc.insecure_channel(target) as ch:
        try:
            s = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(s)
        except grpc.RpcError as e:
            return e.code().name


@dataclass
class Report:
    seconds: float
    calls: dict[str, dict[str, int]]          # call -> status -> count
    server_errors: int
    unexpected: dict[str, dict]               # "call STATUS" -> {"count": n, "example": details}
    uploads_checked: int
    uploads_lost: list[str]
    drained: bool
    gauges_after: dict[str, float]
    drain_s: float
    health: str
    log_errors: list[str]                     # ERROR lines and tracebacks' last lines in the server log
    rss_start_mib: float                      # after provisioning, before any traffic
    rss_before_mib: float                     # after the warm-up (the baseline of the growth)
    rss_peak_mib: float
    rss_after_mib: float                      # after the traffic and the drain
    max_rss_growth_mib: float = 0.0

    @property
    def checks(self) -> dict[str, bool]:
        out = {"server errors": self.server_errors == 0, "unexpected statuses": not self.unexpected,
               "uploads lost": not self.uploads_lost, "gauges drained": self.drained,
               "health": self.health == "SERVING", "server log clean": not self.log_errors}
        if self.max_rss_growth_mib:
            out["rss growth"] = self.rss_after_mib - self.rss_before_mib <= self.max_rss_growth_mib
        return out

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def render(self) -> str:
        out = ["", f"{'call':<44}{'calls':>7}  statuses"]
        for call, statuses in sorted(self.calls.items()):
            shown = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items(), key=lambda kv: -kv[1]))
            out.append(f"{call:<44}{sum(statuses.values()):>7}  {shown}")
        total = sum(sum(s.values()) for s in self.calls.values())
        out += ["", f"{total} calls in {self.seconds:.0f} s ({total / max(self.seconds, 1e-9):.1f}/s)"]
        c = self.checks

        def check(name: str, value: str, key: str, note: str = "") -> None:
            out.append(f"{name:<21}{value:<52}{'ok' if c[key] else 'FAILED'}{note}")
        check("server errors", str(self.server_errors), "server errors", "  (INTERNAL/UNKNOWN/DATA_LOSS, 5xx, cut streams)")
        check("unexpected statuses", str(sum(u["count"] for u in self.unexpected.values())), "unexpected statuses")
        out += [f"    {k} x{u['count']}: {u['example']!r}" for k, u in sorted(self.unexpected.items())]
        check("uploads lost", f"{len(self.uploads_lost)} of {self.uploads_checked} acknowledged", "uploads lost")
        out += [f"    {x}" for x in self.uploads_lost[:10]]
        gauges_ = " ".join(f"{n.removeprefix('lorafleet_')}={v:g}" for n, v in self.gauges_after.items())
        check("gauges drained", f"{gauges_} after {self.drain_s:.1f} s", "gauges drained")
        check("health", self.health, "health")
        check("server log clean", f"{len(self.log_errors)} ERROR lines / tracebacks", "server log clean")
        out += [f"    {x}" for x in dict.fromkeys(self.log_errors[:200])][:8]
        growth = self.rss_after_mib - self.rss_before_mib
        rss = (f"{self.rss_before_mib:.0f} -> {self.rss_after_mib:.0f} MiB ({growth:+.1f} MiB since the warm-up; "
               f"{self.rss_start_mib:.0f} MiB before any traffic, peak {self.rss_peak_mib:.0f})")
        if "rss growth" in c:
            check("server RSS", rss, "rss growth", f"  (limit +{self.max_rss_growth_mib:g} MiB)")
        else:
            out.append(f"{'server RSS':<21}{rss}")
        out.append(f"{'soak':<21}{'PASSED' if self.ok else 'FAILED'}")
        return "\n".join(out)


def report_of(seconds: float, tally: Tally, **kw) -> Report:
    calls: dict[str, dict[str, int]] = {}
    for (call, status), n in tally.calls.items():
        calls.setdefault(call, {})[status] = n
    errors = sum(n for (_, s), n in tally.calls.items() if s in SERVER_ERRORS or s.startswith("HTTP_5"))
    unexpected = {f"{c} {s}": {"count": n, "example": tally.examples.get((c, s), "")}
                  for (c, s), n in tally.unexpected.items()}
    return Report(seconds, calls, errors, unexpected, **kw)


# ---------------------------------------------------------------- the run
def soak(opts, workdir: Path, log: Path) -> Report:
    keys_file = workdir / "keys.json"
    tenants = create_keys(keys_file, opts.tenants)
    server_args = ["--model", prepare_model(opts.model, workdir), "--api-keys", str(keys_file),
                   "--data-dir", str(workdir / "data"), *shlex.split(opts.server_args)]
    print(f"soak: starting the server ({opts.model or 'the default model'}; log {log}) ...", flush=True)
    proc, target, metrics_url, http = start_server(server_args, log)
    try:
        wait_serving(target)
        tally, ledger = Tally(), Ledger()
        with grpc.insecure_channel(target) as ch:
            info = pb_grpc.InferenceStub(ch).GetServerInfo(pb.GetServerInfoRequest(), metadata=md(tenants[0][1], tenants[0][0]),
                                                            timeout=60)
            adapters = pb_grpc.AdaptersStub(ch)
            for i, t in enumerate(tenants):
                for name in (STABLE, HOT):
                    upload(adapters, t, name, lora_archive(info.hidden_size, info.num_layers, rank=4, seed=i,
                                                           labels=LABELS), tally, ledger)
        with httpx.Client(timeout=30) as c:
            base = c.get(f"http://{http}/v1/models", headers={"authorization": f"Bearer {tenants[0][1]}"}).json()
        fleet = Fleet(target, f"http://{http}", base["data"][0]["id"], tenants, info.hidden_size, info.num_layers)
        rss_start = rss_mib(proc.pid)
        print(f"soak: {opts.seconds:g} s of traffic from {opts.threads} threads + {opts.churn} churning adapters, "
              f"{len(tenants)} tenants, against {target} (HTTP {http})", flush=True)
        t0 = time.monotonic()
        stop_at = t0 + opts.seconds
        threads = [threading.Thread(target=Worker(fleet, opts, tally, opts.seed * 1000 + i).run, args=(stop_at,),
                                    name=f"soak-worker-{i}", daemon=True) for i in range(opts.threads)]
        threads += [threading.Thread(target=churn, args=(fleet, tenants[j::opts.churn], tally, ledger,
                                                         opts.seed * 1000 + 500 + j, stop_at),
                                     name=f"soak-churn-{j}", daemon=True) for j in range(min(opts.churn, len(tenants)))]
        for t in threads:
            t.start()
        rss_before, peak = watch_rss(proc.pid, threads, t0 + opts.warmup_s, stop_at + opts.request_timeout + 30)
        elapsed = time.monotonic() - t0
        if any(t.is_alive() for t in threads):
            tally.add("soak", "HUNG_THREAD", set(), "a traffic thread did not finish after its last deadline")
        drained, after, drain_s = wait_drained(metrics_url, opts.drain_s)
        checked, lost = lost_uploads(fleet, ledger)
        status = health(target) if proc.poll() is None else f"exited {proc.returncode}"
        rss_after = rss_mib(proc.pid) if proc.poll() is None else float("nan")
        stop(proc)                                   # a clean SIGTERM drain is part of the log check
        return report_of(elapsed, tally, uploads_checked=checked, uploads_lost=lost, drained=drained,
                         gauges_after=after, drain_s=drain_s, health=status, log_errors=log_errors(log),
                         rss_start_mib=rss_start, rss_before_mib=rss_before, rss_peak_mib=peak,
                         rss_after_mib=rss_after, max_rss_growth_mib=opts.max_rss_growth_mib)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="duration of the traffic in minutes")
    p.add_argument("--seconds", type=float, default=None, help="duration in seconds (default 60 without --minutes)")
    p.add_argument("--model", default="tiny", help="the server's --model ('tiny': with the tiny chat template; "
                                                  "'': the default model)")
    p.add_argument("--tenants", type=int, default=4, help="tenants with keys and adapters")
    p.add_argument("--threads", type=int, default=8, help="threads of mixed traffic")
    p.add_argument("--churn", type=int, default=2, help="threads uploading, hot-swapping and deleting adapters")
    p.add_argument("--max-new-tokens", type=int, default=24, help="most tokens a generation asks for")
    p.add_argument("--prompt-chars", type=int, default=120, help="longest prompt, in characters")
    p.add_argument("--request-timeout", type=float, default=60.0, help="deadline of a normal call, seconds")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="seconds of traffic before the RSS baseline is read (default: a fifth of the run, at most 60)")
    p.add_argument("--drain-s", type=float, default=30.0, help="seconds the gauges get to read 0 after the traffic")
    p.add_argument("--max-rss-growth-mib", type=float, default=0.0, help="make RSS growth a check (0 = report only)")
    p.add_argument("--extremes", action="store_true", help="also send in-range extremes (temperature 1e-38, "
                                                           "lone surrogates, deep JSON) among the hostile requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic")
    p.add_argument("--server-args", default="", help="more flags for the server (one string)")
    p.add_argument("--reports", type=Path, default=REPORTS, help="where the server log and the report go")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    opts = p.parse_args(argv)
    opts.seconds = opts.minutes * 60 if opts.minutes is not None else (opts.seconds or 60.0)
    opts.churn = max(1, opts.churn)
    opts.warmup_s = min(opts.seconds / 5, 60.0) if opts.warmup_s is None else opts.warmup_s
    opts.reports.mkdir(parents=True, exist_ok=True)
    stamp = opts.reports / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-soak-"))
    try:
        report = soak(opts, workdir, Path(f"{stamp}_server.log"))
    except (SystemExit, OSError, grpc.RpcError, httpx.HTTPError) as e:
        print(f"soak: the run broke: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report.render()
    print(text)
    Path(f"{stamp}_report.txt").write_text(text + "\n")
    doc = {**asdict(report), "checks": report.checks, "ok": report.ok}
    for path in (Path(f"{stamp}_report.json"), opts.json):
        if path is not None:
            path.write_text(json.dumps(doc, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
