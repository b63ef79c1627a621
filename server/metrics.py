"""Every Prometheus metric of the server, defined here and nowhere else.

Names carry the `lorafleet_` prefix and their unit; counters end in `_total` (prometheus-client
appends it, and adds a `_created` sample). Histogram buckets span CPU speeds (a step of the
default model on two cores takes tens of ms) and GPU speeds (a decode step takes ~1 ms).
Labels are bounded sets: never an adapter name or request id; a tenant only through
`tenant_label()`, which caps the number of distinct values.

Requests (observed by the servicers through server/api/common.py):
  lorafleet_requests_total{method,code,protocol}  counter  calls finished; code = grpc.StatusCode name (the
                                                           HTTP door counts its answers by the same names);
                                                           protocol = grpc | http
  lorafleet_tenant_requests_total{tenant,code,protocol}  counter  generations finished per tenant (see tenant_label)
  lorafleet_tenant_tokens_total{tenant,kind}      counter  tokens per tenant; kind = prompt | generated
  lorafleet_http_connections                      gauge    HTTP door connections open now
  lorafleet_http_connections_closed_total{reason} counter  HTTP connections the server closed on its own;
                                                           reason = limit (refused at --http-max-connections) |
                                                           header_timeout | body_timeout

Engine (the engine thread reports through record_step / record_load / record_finish / record_cache):
  lorafleet_time_to_first_token_seconds           hist     arrival to first generated token
  lorafleet_inter_token_latency_seconds           hist     gap between two consecutive output tokens of a
                                                           request (one observation per token after the first)
  lorafleet_time_per_output_token_seconds         hist     mean gap between a request's output tokens (one per request)
  lorafleet_e2e_request_latency_seconds           hist     arrival to finish
  lorafleet_queue_wait_seconds                    hist     arrival to admission into a KV slot
  lorafleet_request_prefill_time_seconds          hist     admission to first token
  lorafleet_request_decode_time_seconds           hist     first token to last token
  lorafleet_request_inference_time_seconds        hist     admission to last token (prefill + decode)
  lorafleet_request_prompt_tokens                 hist     the caller's prompt tokens, per finished request
  lorafleet_request_generation_tokens             hist     tokens generated, per finished request
  lorafleet_request_max_tokens                    hist     the request's max_tokens (max_new_tokens)
                                                           (the three token histograms: 1-2-5 buckets up to
                                                           --max-context-tokens, as vLLM's up to max_model_len)
  lorafleet_prompt_tokens_total                   counter  prompt tokens prefilled
  lorafleet_generated_tokens_total                counter  tokens generated
  lorafleet_running_requests                      gauge    sequences holding a KV slot
  lorafleet_waiting_requests                      gauge    sequences queued for a KV slot
  lorafleet_batch_size                            hist     sequences in one engine step
  lorafleet_batch_tokens                          hist     tokens in one engine step
  lorafleet_batch_adapters                        hist     distinct adapters in one engine step
                                                           (rows without an adapter do not count)
  lorafleet_kv_cache_usage_ratio                  gauge    fraction of KV slots in use (0-1)
  lorafleet_finished_requests_total{reason}       counter  sequences finished; reason = length | stop |
                                                           eos | cancelled | error
  lorafleet_lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}
                                                  gauge    vLLM's LoRA info: one series, value = the unix time it
                                                           was last refreshed (at most every LORA_INFO_INTERVAL_S
                                                           while requests run); labels = --adapter-slots and the
                                                           adapters of running / waiting requests, comma-separated
                                                           'tenant/name@N', sorted, at most LORA_INFO_MAX_ADAPTERS
                                                           then '+K' for the K left out. The tenant part goes
                                                           through tenant_label ('other' unless per-tenant metrics
                                                           are on); adapter names do appear. Replaced on change.
  lorafleet_server_info{version,model_name}       gauge    1; joins the served model's name onto any series

Adapters (the engine's cache statistics through record_cache, and the upload servicer); tier = device | host:
  lorafleet_adapter_cache_hits_total{tier}        counter  adapter found resident in the tier
  lorafleet_adapter_cache_misses_total{tier}      counter  adapter had to be loaded into the tier
  lorafleet_adapter_evictions_total{tier}         counter  adapters evicted from the tier (LRU)
  lorafleet_adapter_load_seconds{tier}            hist     time to make an adapter resident in the tier
                                                           (host: disk -> memory; device: host -> slot)
  lorafleet_adapters_resident{tier}               gauge    adapters resident in the tier now
  lorafleet_adapter_uploads_total{outcome}        counter  finished uploads; outcome = ok | invalid |
                                                           too_large | checksum | quota | error

vLLM's names (`vllm:...`, with vLLM's labels model_name and engine) for the series whose meaning is
the same are served next to ours by `VllmNames`, a collector that renames our samples at scrape
time (one observation, two names, the same values; our buckets); the table is `VLLM_NAMES`.
`configure(vllm_names=False)` (--metrics-vllm-names off) leaves them out. promtool's lint flags
their colons (Prometheus reserves colons for recording rules; vLLM uses them anyway).

`exposition(accept)` renders the registry for both endpoints (the metrics port and the HTTP door's
/metrics): OpenMetrics when the scraper asks for it, as Prometheus does, else the text format, and
colons kept in both. The metrics port itself (`serve_metrics`) binds exclusively, gives each
scrape connection METRICS_TIMEOUT_S and serves at most METRICS_MAX_CONNECTIONS at once.

Per-tenant series are off unless `configure(per_tenant=True, ...)`; while off, every tenant is
counted under tenant="other", so the series exist and sum to the totals either way.
"""
from __future__ import annotations

import gzip
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterator
from wsgiref.simple_server import make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer, _SilentHandler
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

from server import version
from server.adapters.refs import SHARED_TENANT

if TYPE_CHECKING:
    from server.engine.sequence import FinishEvent, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   25.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTER_COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTER_LOAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                        0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

TIERS = ("device", "host")
UPLOAD_OUTCOMES = ("ok", "invalid", "too_large", "checksum", "quota", "error")
TOKEN_KINDS = ("prompt", "generated")
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")     # server.engine.sequence.FinishReason
OTHER_TENANT = "other"
DEFAULT_MAX_TENANTS = 50
METRICS_TIMEOUT_S = 10.0
METRICS_MAX_CONNECTIONS = 16
HTTP_CLOSE_REASONS = ("limit", "header_timeout", "body_timeout")
DEFAULT_MAX_CONTEXT = 512                 # the token histograms' top bucket until configure() sets it
LORA_INFO_INTERVAL_S = 1.0                # lora_requests_info is refreshed at most this often while busy
LORA_INFO_MAX_ADAPTERS = 16               # adapter names per label of lora_requests_info


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# ---------------------------------------------------------------- requests
PROTOCOLS = ("grpc", "http")
REQUESTS = Counter("lorafleet_requests", "Calls finished, by method, status code and protocol (grpc | http)",
                   ["method", "code", "protocol"])
TENANT_REQUESTS = Counter("lorafleet_tenant_requests",
                          "Generations finished, by tenant (bounded, see tenant_label), status code and protocol",
                          ["tenant", "code", "protocol"])
TENANT_TOKENS = Counter("lorafleet_tenant_tokens",
                        "Tokens by tenant (bounded, see tenant_label); kind = prompt | generated",
                        ["tenant", "kind"])
HTTP_CONNECTIONS = Gauge("lorafleet_http_connections", "HTTP door connections open now")
HTTP_CONNECTIONS_CLOSED = Counter("lorafleet_http_connections_closed",
                                  "HTTP connections the server closed on its own, by reason (limit | "
                                  "header_timeout | body_timeout)", ["reason"])

# ---------------------------------------------------------------- engine
TIME_TO_FIRST_TOKEN = Histogram("lorafleet_time_to_first_token_seconds",
                                "Arrival to first generated token", buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("lorafleet_inter_token_latency_seconds",
                                "Time between two consecutive output tokens of a request (per token)",
                                buckets=TOKEN_LATENCY_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("lorafleet_time_per_output_token_seconds",
                                  "Mean time between output tokens of a request (per request)",
                                  buckets=TOKEN_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("lorafleet_e2e_request_latency_seconds", "Arrival to finish",
                        buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("lorafleet_queue_wait_seconds", "Arrival to admission into a KV slot",
                       buckets=LATENCY_BUCKETS)
PREFILL_TIME = Histogram("lorafleet_request_prefill_time_seconds", "Admission to first token",
                         buckets=LATENCY_BUCKETS)
DECODE_TIME = Histogram("lorafleet_request_decode_time_seconds", "First token to last token",
                        buckets=LATENCY_BUCKETS)
INFERENCE_TIME = Histogram("lorafleet_request_inference_time_seconds",
                           "Admission to last token (prefill + decode)", buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("lorafleet_prompt_tokens", "Prompt tokens prefilled")
GENERATED_TOKENS = Counter("lorafleet_generated_tokens", "Tokens generated")
RUNNING = Gauge("lorafleet_running_requests", "Sequences holding a KV slot")
WAITING = Gauge("lorafleet_waiting_requests", "Sequences queued for a KV slot")
BATCH_SIZE = Histogram("lorafleet_batch_size", "Sequences in one engine step", buckets=BATCH_BUCKETS)
BATCH_TOKENS = Histogram("lorafleet_batch_tokens", "Tokens in one engine step",
                         buckets=(1, 4, 16, 64, 256, 1024, 4096))
BATCH_ADAPTERS = Histogram("lorafleet_batch_adapters",
                           "Distinct adapters in one engine step (rows without an adapter do not count)",
                           buckets=ADAPTER_COUNT_BUCKETS)
KV_CACHE_USAGE = Gauge("lorafleet_kv_cache_usage_ratio", "Fraction of KV slots in use")
FINISHED = Counter("lorafleet_finished_requests", "Sequences finished, by reason", ["reason"])
LORA_INFO = Gauge("lorafleet_lora_requests_info",
                  "Adapters of running and waiting requests (one series; value = unix time of its last refresh)",
                  ["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
SERVER_INFO = Gauge("lorafleet_server_info", "1, labelled with the server's version and the served model",
                    ["version", "model_name"])


class _TokenHistograms:
    """The per-request token histograms, whose 1-2-5 buckets end at the context length: rebuilt
    (registered afresh, counts from zero) when configure() is given another one."""

    def __init__(self, max_context: int) -> None:
        self.max_context = 0
        self.rebuild(max_context)

    def rebuild(self, max_context: int) -> None:
        if max_context == self.max_context:
            return
        if self.max_context:
            for old in (self.prompt, self.generation, self.max_tokens):
                REGISTRY.unregister(old)
        buckets = one_two_five(max_context)
        self.prompt = Histogram("lorafleet_request_prompt_tokens", "The caller's prompt tokens, per finished request",
                                buckets=buckets)
        self.generation = Histogram("lorafleet_request_generation_tokens", "Tokens generated, per finished request",
                                    buckets=buckets)
        self.max_tokens = Histogram("lorafleet_request_max_tokens", "The request's max_tokens (max_new_tokens)",
                                    buckets=buckets)
        self.max_context = max_context


TOKENS = _TokenHistograms(DEFAULT_MAX_CONTEXT)

# ---------------------------------------------------------------- adapters
ADAPTER_CACHE_HITS = Counter("lorafleet_adapter_cache_hits",
                             "Adapter lookups that found it resident, by tier (device | host)", ["tier"])
ADAPTER_CACHE_MISSES = Counter("lorafleet_adapter_cache_misses",
                               "Adapter lookups that had to load it, by tier (device | host)", ["tier"])
ADAPTER_EVICTIONS = Counter("lorafleet_adapter_evictions",
                            "Adapters evicted (least recently used first), by tier (device | host)", ["tier"])
ADAPTER_LOAD_SECONDS = Histogram("lorafleet_adapter_load_seconds",
                                 "Time to make an adapter resident: host = disk to memory, "
                                 "device = host memory to a device slot", ["tier"],
                                 buckets=ADAPTER_LOAD_BUCKETS)
ADAPTERS_RESIDENT = Gauge("lorafleet_adapters_resident", "Adapters resident now, by tier (device | host)",
                          ["tier"])
UPLOADS = Counter("lorafleet_adapter_uploads",
                  "Finished adapter uploads, by outcome (ok | invalid | too_large | checksum | quota | error)",
                  ["outcome"])

# Label values known in advance get their series at 0 from the start, so rate() and dashboards
# see them before the first event.
for _tier in TIERS:
    for _m in (ADAPTER_CACHE_HITS, ADAPTER_CACHE_MISSES, ADAPTER_EVICTIONS, ADAPTER_LOAD_SECONDS,
               ADAPTERS_RESIDENT):
        _m.labels(_tier)
for _outcome in UPLOAD_OUTCOMES:
    UPLOADS.labels(_outcome)
for _reason in HTTP_CLOSE_REASONS:
    HTTP_CONNECTIONS_CLOSED.labels(_reason)
for _reason in FINISH_REASONS:
    FINISHED.labels(_reason)


# ---------------------------------------------------------------- per-tenant label
class _TenantLabels:
    """The first `max_tenants` distinct tenants keep their name as a label value; the rest are "other".

    Called from the gRPC loop and the engine thread, hence the lock (not on the forward path).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.per_tenant = False
        self.max_tenants = DEFAULT_MAX_TENANTS
        self._seen: set[str] = set()

    def configure(self, per_tenant: bool, max_tenants: int) -> None:
        if max_tenants < 0:
            raise ValueError(f"max_tenants must be >= 0, got {max_tenants}")
        with self._lock:
            self.per_tenant, self.max_tenants = per_tenant, max_tenants
            self._seen = set()

    def label(self, tenant: str) -> str:
        if not self.per_tenant or not tenant or tenant == OTHER_TENANT:
            return OTHER_TENANT
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self.max_tenants:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANT


_tenants = _TenantLabels()


def configure(per_tenant: bool, max_tenants: int = DEFAULT_MAX_TENANTS, *, model_name: str = "",
              max_context_tokens: int = DEFAULT_MAX_CONTEXT, max_lora: int = 0, vllm_names: bool = True) -> None:
    """Switch per-tenant series on or off and cap their number (forgets the tenants seen so far);
    name the served model (vLLM's model_name label, lorafleet_server_info); end the token
    histograms' buckets at the context length; `max_lora` (--adapter-slots) labels
    lora_requests_info; `vllm_names` serves vLLM's names next to ours."""
    _tenants.configure(per_tenant, max_tenants)
    TOKENS.rebuild(max_context_tokens)
    VLLM.model_name, VLLM.on = model_name, vllm_names
    _lora.max_lora = max_lora
    SERVER_INFO.clear()
    SERVER_INFO.labels(version(), model_name).set(1)


def tenant_label(tenant: str) -> str:
    """The `tenant` label value for a tenant: its name while per-tenant metrics are on and it is
    among the first `max_tenants` distinct tenants seen, else "other" (also for an empty name)."""
    return _tenants.label(tenant)


# ---------------------------------------------------------------- vLLM's names
VLLM_FINISHED_REASONS = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "abort", "error": "error"}


@dataclass(frozen=True)
class VllmName:
    """vLLM's name for one of our metrics whose meaning is the same."""
    name: str                                   # vLLM's metric (family) name
    ours: Callable[[], object]                  # our metric (a callable: the token histograms are rebuilt)
    model_label: bool = True                    # add vLLM's model_name and engine labels
    relabel: Callable[[dict], dict] | None = None   # our labels -> vLLM's (samples that meet are summed)


def _finished_reason(labels: dict) -> dict:
    return {"finished_reason": VLLM_FINISHED_REASONS.get(labels["reason"], labels["reason"])}


VLLM_NAMES: tuple[VllmName, ...] = (
    VllmName("vllm:time_to_first_token_seconds", lambda: TIME_TO_FIRST_TOKEN),
    VllmName("vllm:inter_token_latency_seconds", lambda: INTER_TOKEN_LATENCY),
    VllmName("vllm:time_per_output_token_seconds", lambda: INTER_TOKEN_LATENCY),   # per token, as vLLM's v1
    VllmName("vllm:request_time_per_output_token_seconds", lambda: TIME_PER_OUTPUT_TOKEN),
    VllmName("vllm:e2e_request_latency_seconds", lambda: E2E_LATENCY),
    VllmName("vllm:request_queue_time_seconds", lambda: QUEUE_WAIT),
    VllmName("vllm:request_prefill_time_seconds", lambda: PREFILL_TIME),
    VllmName("vllm:request_decode_time_seconds", lambda: DECODE_TIME),
    VllmName("vllm:request_inference_time_seconds", lambda: INFERENCE_TIME),
    VllmName("vllm:request_prompt_tokens", lambda: TOKENS.prompt),
    VllmName("vllm:request_generation_tokens", lambda: TOKENS.generation),
    VllmName("vllm:request_params_max_tokens", lambda: TOKENS.max_tokens),
    VllmName("vllm:request_max_num_generation_tokens", lambda: TOKENS.max_tokens),   # n is always 1
    VllmName("vllm:prompt_tokens", lambda: PROMPT_TOKENS),
    VllmName("vllm:generation_tokens", lambda: GENERATED_TOKENS),
    VllmName("vllm:iteration_tokens_total", lambda: BATCH_TOKENS),
    VllmName("vllm:request_success", lambda: FINISHED, relabel=_finished_reason),
    VllmName("vllm:num_requests_running", lambda: RUNNING),
    VllmName("vllm:num_requests_waiting", lambda: WAITING),
    VllmName("vllm:kv_cache_usage_perc", lambda: KV_CACHE_USAGE),
    VllmName("vllm:gpu_cache_usage_perc", lambda: KV_CACHE_USAGE),                   # vLLM's older name
    VllmName("vllm:lora_requests_info", lambda: LORA_INFO, model_label=False),
)


class VllmNames:
    """A collector that serves each of VLLM_NAMES: our metric's samples under vLLM's name, with
    vLLM's labels (model_name, engine="0"; finished_reason), `_created` samples left out."""

    def __init__(self) -> None:
        self.on = True
        self.model_name = ""

    def describe(self) -> list[Metric]:
        return [Metric(v.name, "", next(iter(v.ours().describe())).type) for v in VLLM_NAMES]

    def collect(self) -> Iterator[Metric]:
        if not self.on:
            return
        for v in VLLM_NAMES:
            yield self._renamed(v)

    def _renamed(self, v: VllmName) -> Metric:
        fam = next(iter(v.ours().collect()))
        out = Metric(v.name, f"{fam.documentation} (lorafleet: {fam.name})", fam.type)
        extra = {"model_name": self.model_name, "engine": "0"} if v.model_label else {}
        values: dict[tuple[str, tuple], float] = {}
        for sample in fam.samples:
            if sample.name.endswith("_created"):
                continue
            labels = v.relabel(sample.labels) if v.relabel else sample.labels
            key = (v.name + sample.name[len(fam.name):], tuple({**labels, **extra}.items()))
            values[key] = values.get(key, 0.0) + sample.value
        for (name, labels), value in values.items():
            out.add_sample(name, dict(labels), value)
        return out


VLLM = VllmNames()
REGISTRY.register(VLLM)


def exposition(accept: str = "", gzipped: bool = False) -> tuple[bytes, str]:
    """The registry as (body, content type): OpenMetrics when `accept` (the scraper's Accept
    header) asks for it, as Prometheus does, else the text format 0.0.4; gzip-compressed when asked.
    Both formats keep the colons of vLLM's names: prometheus-client's own OpenMetrics negotiation
    (make_wsgi_app) writes `vllm:x`'s samples as `vllm_x` under a `# TYPE vllm:x` line."""
    if "application/openmetrics-text" in accept:
        body = openmetrics.generate_latest(REGISTRY, escaping=openmetrics.ALLOWUTF8)
        content_type = openmetrics.CONTENT_TYPE_LATEST
    else:
        body, content_type = generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
    return (gzip.compress(body) if gzipped else body), content_type


def _metrics_app(environ, start_response):
    """The metrics port's WSGI app: every path but /favicon.ico is the exposition (gzip when asked)."""
    if environ.get("PATH_INFO") == "/favicon.ico":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b""]
    gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
    body, content_type = exposition(environ.get("HTTP_ACCEPT", ""), gzipped)
    headers = [("Content-Type", content_type)] + ([("Content-Encoding", "gzip")] if gzipped else [])
    start_response("200 OK", headers)
    return [body]


class _ScrapeHandler(_SilentHandler):
    timeout = METRICS_TIMEOUT_S            # a silent or slow scraper's socket times out


class _MetricsServer(ThreadingWSGIServer):
    """A thread per scrape, at most METRICS_MAX_CONNECTIONS of them; more are closed at once."""

    allow_reuse_address = True             # SO_REUSEADDR only: a port another server holds is refused

    def __init__(self, server_address: tuple[str, int], handler_class) -> None:
        self.slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in server_address[0] else socket.AF_INET
        super().__init__(server_address, handler_class)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_metrics(port: int, host: str):
    """Start the /metrics HTTP endpoint (0 picks a port); returns the HTTP server
    (`.server_address[1]` is the port, `.shutdown()` stops it). A port in use is one line and
    exit status 1 (SystemExit)."""
    try:
        server = make_server(host, port, _metrics_app, _MetricsServer, handler_class=_ScrapeHandler)
    except OSError as err:
        raise SystemExit(f"lorafleet-server: cannot bind the metrics port {host}:{port}: {err.strerror or err}") \
            from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def record_step(stats) -> None:
    """Export one engine step's `StepStats` (engine thread)."""
    BATCH_SIZE.observe(stats.rows)
    BATCH_TOKENS.observe(stats.tokens)
    BATCH_ADAPTERS.observe(stats.distinct_adapters)
    PROMPT_TOKENS.inc(stats.prompt_tokens)
    GENERATED_TOKENS.inc(sum(stats.generated.values()))
    for tenant, n in stats.generated.items():
        TENANT_TOKENS.labels(tenant_label(tenant), "generated").inc(n)
    for seconds in stats.first_token_seconds:
        TIME_TO_FIRST_TOKEN.observe(seconds)
    for seconds in stats.token_gaps:
        INTER_TOKEN_LATENCY.observe(seconds)


def record_load(running: Collection["Sequence"], waiting: Collection["Sequence"], kv_usage: float) -> None:
    """The engine's gauges, set after every loop iteration (idle ones too), from the sequences
    holding a KV slot and those waiting for one (engine thread: it owns them)."""
    RUNNING.set(len(running))
    WAITING.set(len(waiting))
    KV_CACHE_USAGE.set(kv_usage)
    _lora.update(running, waiting)


def record_finish(seq: "Sequence", ev: "FinishEvent", now: float) -> None:
    """Export a finished sequence (engine thread): its reason, token counts and phases from its
    time.monotonic() stamps (arrival, admitted_at, first_token_at, last_token_at; a phase it never
    reached is not observed). Classification rows generate nothing: no generation or max_tokens."""
    FINISHED.labels(ev.reason.value).inc()
    E2E_LATENCY.observe(now - seq.arrival)
    TOKENS.prompt.observe(ev.prompt_tokens)
    if not seq.classify:
        TOKENS.generation.observe(ev.completion_tokens)
        TOKENS.max_tokens.observe(seq.params.max_new_tokens)
    first, last = seq.first_token_at, seq.last_token_at
    if first is None or last is None:
        return
    if seq.admitted_at is not None:
        PREFILL_TIME.observe(first - seq.admitted_at)
        INFERENCE_TIME.observe(last - seq.admitted_at)
    DECODE_TIME.observe(last - first)
    if ev.completion_tokens > 1:
        TIME_PER_OUTPUT_TOKEN.observe((last - first) / (ev.completion_tokens - 1))


class _LoraInfo:
    """lorafleet_lora_requests_info's one live series (see the module docstring)."""

    def __init__(self) -> None:
        self.max_lora = 0
        self._labels: tuple[str, str, str] | None = None
        self._at = float("-inf")

    def update(self, running: Collection["Sequence"], waiting: Collection["Sequence"]) -> None:
        now = time.monotonic()
        if (running or waiting) and now - self._at < LORA_INFO_INTERVAL_S:
            return
        self._at = now
        labels = (str(self.max_lora), _adapter_list(waiting), _adapter_list(running))
        if labels != self._labels:
            if self._labels is not None:
                try:
                    LORA_INFO.remove(*self._labels)
                except KeyError:            # another engine in this process replaced it (tests)
                    pass
            self._labels = labels
        LORA_INFO.labels(*labels).set_to_current_time()


_lora = _LoraInfo()


def _adapter_list(seqs: Collection["Sequence"]) -> str:
    """'tenant/name@N,...' of the sequences' adapters: sorted, at most LORA_INFO_MAX_ADAPTERS, then '+K'."""
    names = sorted({_adapter_name(s.adapter.key) for s in seqs if s.adapter is not None})
    if len(names) > LORA_INFO_MAX_ADAPTERS:
        names = names[:LORA_INFO_MAX_ADAPTERS] + [f"+{len(names) - LORA_INFO_MAX_ADAPTERS}"]
    return ",".join(names)


def _adapter_name(key) -> str:
    tenant = key.tenant if key.tenant == SHARED_TENANT else tenant_label(key.tenant)
    return f"{tenant}/{key.name}@{key.version}"


def record_cache(last, now) -> None:
    """Turn the adapter cache's cumulative `CacheStats` into increments (engine thread)."""
    for tier in TIERS:
        before, after = (getattr(last, tier) if last else None), getattr(now, tier)
        hits = after.hits - (before.hits if before else 0)
        misses = after.misses - (before.misses if before else 0)
        evictions = after.evictions - (before.evictions if before else 0)
        seconds = after.load_seconds - (before.load_seconds if before else 0.0)
        ADAPTER_CACHE_HITS.labels(tier).inc(hits)
        ADAPTER_CACHE_MISSES.labels(tier).inc(misses)
        ADAPTER_EVICTIONS.labels(tier).inc(evictions)
        for _ in range(misses):
            ADAPTER_LOAD_SECONDS.labels(tier).observe(seconds / misses)
    ADAPTERS_RESIDENT.labels("device").set(now.resident_slots)
    ADAPTERS_RESIDENT.labels("host").set(now.host_entries)


# ---------------------------------------------------------------- paged KV and prefix cache (issue 22)
# Kept in one block of their own (the engine reports through record_kv_blocks, record_prefix_lookup and
# record_preemption):
#   lorafleet_kv_blocks{state}                        gauge    KV blocks now; state = used (referenced by a
#                                                              sequence) | cached (unreferenced, kept by the
#                                                              prefix cache, evicted LRU on demand) | free
#   lorafleet_prefix_cache_query_tokens_total{tenant} counter  KV positions admitted sequences needed
#   lorafleet_prefix_cache_hit_tokens_total{tenant}   counter  of which found in the prefix cache (not computed)
#   lorafleet_prefix_cache_hit_ratio                  gauge    hit / query tokens since start, all tenants
#   lorafleet_preemptions_total{tenant}               counter  sequences preempted for lack of KV blocks
#                                                              (recomputed later)
# tenant: tenant_label() (one "other" series unless --metrics-per-tenant).
KV_BLOCK_STATES = ("used", "cached", "free")
KV_BLOCKS = Gauge("lorafleet_kv_blocks", "KV blocks now, by state (used | cached | free)", ["state"])
PREFIX_QUERY_TOKENS = Counter("lorafleet_prefix_cache_query_tokens",
                              "KV positions admitted sequences needed (prefix-cache lookups), by tenant", ["tenant"])
PREFIX_HIT_TOKENS = Counter("lorafleet_prefix_cache_hit_tokens",
                            "KV positions found in the prefix cache at admission, by tenant", ["tenant"])
PREFIX_HIT_RATIO = Gauge("lorafleet_prefix_cache_hit_ratio", "Prefix-cache hit tokens / query tokens since start")
PREEMPTIONS = Counter("lorafleet_preemptions", "Sequences preempted for lack of KV blocks (recomputed later), by tenant",
                      ["tenant"])
for _state in KV_BLOCK_STATES:
    KV_BLOCKS.labels(_state)
_prefix_totals = [0, 0]          # query, hit tokens since start (engine thread only)


def record_kv_blocks(used: int, cached: int, free: int) -> None:
    """KV block gauges, set after every engine loop iteration."""
    for state, n in zip(KV_BLOCK_STATES, (used, cached, free)):
        KV_BLOCKS.labels(state).set(n)


def record_prefix_lookup(tenant: str, query_tokens: int, hit_tokens: int) -> None:
    """One admission's prefix-cache lookup (engine thread)."""
    label = tenant_label(tenant)
    PREFIX_QUERY_TOKENS.labels(label).inc(query_tokens)
    PREFIX_HIT_TOKENS.labels(label).inc(hit_tokens)
    _prefix_totals[0] += query_tokens
    _prefix_totals[1] += hit_tokens
    PREFIX_HIT_RATIO.set(_prefix_totals[1] / _prefix_totals[0] if _prefix_totals[0] else 0.0)


def record_preemption(tenant: str) -> None:
    PREEMPTIONS.labels(tenant_label(tenant)).inc()
