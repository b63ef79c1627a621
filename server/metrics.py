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
  lorafleet_time_per_output_token_seconds         hist     mean gap between a request's output tokens
  lorafleet_e2e_request_latency_seconds           hist     arrival to last token
  lorafleet_queue_wait_seconds                    hist     arrival to admission into a KV slot
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

Adapters (the engine's cache statistics through record_cache, and the upload servicer); tier = device | host:
  lorafleet_adapter_cache_hits_total{tier}        counter  adapter found resident in the tier
  lorafleet_adapter_cache_misses_total{tier}      counter  adapter had to be loaded into the tier
  lorafleet_adapter_evictions_total{tier}         counter  adapters evicted from the tier (LRU)
  lorafleet_adapter_load_seconds{tier}            hist     time to make an adapter resident in the tier
                                                           (host: disk -> memory; device: host -> slot)
  lorafleet_adapters_resident{tier}               gauge    adapters resident in the tier now
  lorafleet_adapter_uploads_total{outcome}        counter  finished uploads; outcome = ok | invalid |
                                                           too_large | checksum | quota | error

The /metrics endpoint itself (`serve_metrics`) binds its port exclusively, gives each scrape
connection METRICS_TIMEOUT_S and serves at most METRICS_MAX_CONNECTIONS at once.

Per-tenant series are off unless `configure(per_tenant=True, ...)`; while off, every tenant is
counted under tenant="other", so the series exist and sum to the totals either way.
"""
from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

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
OTHER_TENANT = "other"
DEFAULT_MAX_TENANTS = 50
METRICS_TIMEOUT_S = 10.0
METRICS_MAX_CONNECTIONS = 16
HTTP_CLOSE_REASONS = ("limit", "header_timeout", "body_timeout")

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
TIME_PER_OUTPUT_TOKEN = Histogram("lorafleet_time_per_output_token_seconds",
                                  "Mean time between output tokens of a request",
                                  buckets=TOKEN_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("lorafleet_e2e_request_latency_seconds", "Arrival to last token",
                        buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("lorafleet_queue_wait_seconds", "Arrival to admission into a KV slot",
                       buckets=LATENCY_BUCKETS)
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


def configure(per_tenant: bool, max_tenants: int = DEFAULT_MAX_TENANTS) -> None:
    """Switch per-tenant series on or off and cap their number; forgets the tenants seen so far."""
    _tenants.configure(per_tenant, max_tenants)


def tenant_label(tenant: str) -> str:
    """The `tenant` label value for a tenant: its name while per-tenant metrics are on and it is
    among the first `max_tenants` distinct tenants seen, else "other" (also for an empty name)."""
    return _tenants.label(tenant)


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
        server = make_server(host, port, make_wsgi_app(), _MetricsServer, handler_class=_ScrapeHandler)
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


def record_load(running: int, waiting: int, kv_usage: float) -> None:
    """The engine's gauges, set after every loop iteration (idle ones too)."""
    RUNNING.set(running)
    WAITING.set(waiting)
    KV_CACHE_USAGE.set(kv_usage)


def record_finish(reason: str, e2e_seconds: float, per_token_seconds: float | None) -> None:
    FINISHED.labels(reason).inc()
    E2E_LATENCY.observe(e2e_seconds)
    if per_token_seconds is not None:
        TIME_PER_OUTPUT_TOKEN.observe(per_token_seconds)


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
