"""Every Prometheus metric of the server, defined here and nowhere else.

Names carry the `lorafleet_` prefix and their unit; counters end in `_total`
(prometheus-client appends it). Buckets span CPU and GPU speeds.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   25.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("lorafleet_requests", "gRPC calls finished, by method and status code",
                   ["method", "code"])
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
KV_CACHE_USAGE = Gauge("lorafleet_kv_cache_usage_ratio", "Fraction of KV slots in use")
FINISHED = Counter("lorafleet_finished_requests", "Sequences finished, by reason", ["reason"])


def serve_metrics(port: int, host: str) -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
