"""Every server knob in one frozen dataclass, built from CLI flags (and LORAFLEET_* env vars).

Nothing else in the server reads flags or the environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.path.expanduser("~")) / ".cache" / "lorafleet"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090                # 0 = pick a free port; -1 = no metrics endpoint
    model_dir: Path | None = None           # None = the embedded default model
    default_model: str = "default"          # preset used when model_dir is None ("default" or "tiny")
    data_dir: Path = DEFAULT_CACHE / "data"
    cache_dir: Path = DEFAULT_CACHE / "models"
    device: str = "auto"                    # auto | cpu | cuda
    dtype: str = "auto"                     # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    max_batch_size: int = 32                # running sequences = KV slots
    max_context_tokens: int = 512           # KV length per slot (prompt + virtual + generated)
    max_prompt_tokens: int = 448
    max_new_tokens: int = 256
    default_new_tokens: int = 64
    max_queued_requests: int = 256
    max_prefill_tokens: int = 2048          # prompt tokens processed in one engine step
    max_stop_strings: int = 8
    max_stop_string_chars: int = 64
    max_classify_batch: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    threads: int = 0                        # torch intra-op threads; 0 = torch's default
    api_keys: Path | None = None            # None = single tenant, loopback only
    tls_cert: Path | None = None            # PEM server certificate (with --tls-key): serve TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None       # PEM CA: require client certificates (mutual TLS)
    adapter_slots: int = 32                 # adapters resident on the device at once
    max_adapter_rank: int = 64
    max_adapter_bytes: int = 256 * 1024 * 1024   # one uploaded archive
    max_virtual_tokens: int = 128           # prefix / prompt tuning length
    host_adapters: int = 256                # adapters kept in host memory behind the slots
    host_adapter_bytes: int = 4 * 1024 ** 3
    tenant_max_adapters: int = 100          # default quotas (a keys-file entry may override)
    tenant_max_adapter_bytes: int = 2 * 1024 ** 3
    tenant_max_concurrent: int = 64
    tenant_max_queued: int = 256
    rescan_interval_s: float = 0.0          # > 0: follow a store shared with other replicas
    metrics_per_tenant: bool = False        # per-tenant request/token series
    metrics_max_tenants: int = 50           # distinct tenant label values; the rest count as "other"

    def describe(self) -> str:
        return "\n".join(f"  {f.name} = {getattr(self, f.name)}" for f in dataclasses.fields(self))


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="lorafleet-server",
        description="Serve one frozen base model and many tenants' adapters over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--host", default=d.host, help="address to bind; keep 127.0.0.1 unless auth is configured")
    a("--port", type=int, default=d.port, help="gRPC port (0 picks a free one and prints it)")
    a("--metrics-port", type=int, default=d.metrics_port,
      help="Prometheus /metrics port (0 picks a free one, -1 disables)")
    a("--model", dest="model_dir", type=Path, default=None,
      help="local Hugging Face Llama/Mistral/Qwen2 directory (config.json, *.safetensors, tokenizer.json);"
           " default: the embedded default model, built once into --cache-dir")
    a("--default-model", choices=["default", "tiny"], default=d.default_model,
      help="which embedded preset to build when --model is not given")
    a("--data-dir", type=Path, default=d.data_dir, help="where uploaded adapters are stored")
    a("--cache-dir", type=Path, default=d.cache_dir, help="where the embedded default model is written")
    a("--device", choices=["auto", "cpu", "cuda"], default=d.device,
      help="auto takes the GPU when one is present")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype,
      help="auto = float32 on CPU, bfloat16 on GPU")
    a("--max-batch-size", type=int, default=d.max_batch_size, help="sequences decoded together (KV slots)")
    a("--max-context-tokens", type=int, default=d.max_context_tokens, help="KV cache length per sequence")
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt accepted")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_new_tokens accepted")
    a("--default-new-tokens", type=int, default=d.default_new_tokens,
      help="max_new_tokens when a request leaves it 0")
    a("--max-queued-requests", type=int, default=d.max_queued_requests,
      help="requests waiting for a slot; beyond it calls get RESOURCE_EXHAUSTED at once")
    a("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
      help="prompt tokens processed per engine step (bounds the latency a long prompt adds to others)")
    a("--max-stop-strings", type=int, default=d.max_stop_strings, help="stop strings per request")
    a("--max-classify-batch", type=int, default=d.max_classify_batch, help="texts per Classify call")
    a("--max-message-bytes", type=int, default=d.max_message_bytes, help="largest gRPC message accepted")
    a("--shutdown-grace-s", type=float, default=d.shutdown_grace_s,
      help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish")
    a("--threads", type=int, default=d.threads, help="torch CPU threads (0 = torch default)")
    a("--api-keys", type=Path, default=None,
      help="JSON keys file (hashes of API keys -> tenant, role, quotas); reloaded on SIGHUP."
           " Without it the server is single-tenant and binds to loopback only")
    a("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve gRPC over TLS (needs --tls-key)")
    a("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    a("--tls-client-ca", type=Path, default=None,
      help="PEM CA bundle: require and verify client certificates (mutual TLS)")
    a("--adapter-slots", type=int, default=d.adapter_slots,
      help="adapters resident on the device at once (distinct adapters per step)")
    a("--max-adapter-rank", type=int, default=d.max_adapter_rank, help="largest LoRA r / bottleneck size")
    a("--max-adapter-bytes", type=int, default=d.max_adapter_bytes, help="largest upload archive")
    a("--max-virtual-tokens", type=int, default=d.max_virtual_tokens, help="longest prefix / prompt tuning")
    a("--host-adapters", type=int, default=d.host_adapters, help="adapters cached in host memory")
    a("--host-adapter-bytes", type=int, default=d.host_adapter_bytes, help="host adapter cache size")
    a("--tenant-max-adapters", type=int, default=d.tenant_max_adapters, help="default quota: adapters stored")
    a("--tenant-max-adapter-bytes", type=int, default=d.tenant_max_adapter_bytes,
      help="default quota: bytes of adapters stored")
    a("--tenant-max-concurrent", type=int, default=d.tenant_max_concurrent,
      help="default quota: requests in flight")
    a("--tenant-max-queued", type=int, default=d.tenant_max_queued, help="default quota: requests queued")
    a("--rescan-interval-s", type=float, default=d.rescan_interval_s,
      help="re-read --data-dir this often to serve adapters other replicas uploaded to a shared"
           " store (and drop ones they deleted); 0 = off")
    a("--metrics-per-tenant", action="store_true", help="export per-tenant request and token counters")
    a("--metrics-max-tenants", type=int, default=d.metrics_max_tenants,
      help="cap on distinct tenant label values (the rest are counted as 'other')")
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    ns = build_parser().parse_args(argv)
    cfg = ServerConfig(**vars(ns))
    return validate_config(cfg)


def validate_config(cfg: ServerConfig) -> ServerConfig:
    problems = []
    if cfg.max_prompt_tokens >= cfg.max_context_tokens:
        problems.append("--max-prompt-tokens must be below --max-context-tokens")
    if cfg.max_batch_size < 1:
        problems.append("--max-batch-size must be at least 1")
    if cfg.default_new_tokens > cfg.max_new_tokens:
        problems.append("--default-new-tokens must not exceed --max-new-tokens")
    if cfg.api_keys is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        problems.append(f"without --api-keys the server is single-tenant and binds to loopback only "
                        f"(got --host {cfg.host})")
    if cfg.api_keys is not None and not cfg.api_keys.is_file():
        problems.append(f"--api-keys {cfg.api_keys}: no such file (create one with `lorafleet keys create`)")
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
