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
    if problems:
        raise SystemExit("lorafleet-server: " + "; ".join(problems))
    return cfg
