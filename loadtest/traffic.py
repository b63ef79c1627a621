"""What the load test sends: tenants, zipf popularity, prompts, adapter archives.

Plain Python and protobuf (no locust, no gevent), so run.py, tests and `bench/` can import it.
"""
from __future__ import annotations

import array
import bisect
import hashlib
import io
import itertools
import json
import random
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lorafleet.v1 import lorafleet_pb2 as pb

LABELS = ("negative", "neutral", "positive")   # the classification head of load-test adapters
# the HTTP door's statuses -> our gRPC status names (server/http/openai.py, ERRORS)
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              409: "ALREADY_EXISTS", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
              500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
WORDS = ("adapter tenant slot segment shrink expand prefill decode batch token cache queue model "
         "replica route metric latency stream kernel rank scale").split()


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str          # API key sent as "authorization: Bearer <key>"; "" = none
    adapter: str      # "name[@version]" sent in GenerateRequest.adapter; "" = the base model

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata: x-tenant (what a load balancer hashes on) and the API key when there is one."""
        md = [("x-tenant", self.name)]
        if self.key:
            md.append(("authorization", f"Bearer {self.key}"))
        return tuple(md)


def synthetic_tenants(n: int) -> list[Tenant]:
    """n tenants without keys or adapters (a single-tenant server: the base model); rank i is the
    i-th most popular. run.py provisions real tenants and adapters instead."""
    return [Tenant(f"tenant-{i:03d}", "", "") for i in range(n)]


def write_adapters_file(path: Path, tenants: list[Tenant]) -> None:
    lines = ["# tenant key adapter  (most popular first; '-' = none)"]
    lines += [f"{t.name} {t.key or '-'} {t.adapter or '-'}" for t in tenants]
    Path(path).write_text("\n".join(lines) + "\n")


def load_adapters_file(path: Path) -> list[Tenant]:
    """Read `tenant key adapter` lines (most popular first; '#' comments; adapter '-' = base model)."""
    tenants = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: want 'tenant key adapter', got {line.strip()!r}")
        name, key, adapter = fields
        tenants.append(Tenant(name, "" if key == "-" else key, "" if adapter == "-" else adapter))
    if not tenants:
        raise ValueError(f"{path}: no 'tenant key adapter' lines")
    return tenants


class Zipf:
    """Draw ranks 0..n-1 with P(k) proportional to 1 / (k + 1) ** s (s = 0 is uniform)."""

    def __init__(self, n: int, s: float, rng: random.Random):
        if n < 1:
            raise ValueError("Zipf needs at least one item")
        self.rng = rng
        self.cdf = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def draw(self) -> int:
        return min(bisect.bisect_left(self.cdf, self.rng.random() * self.cdf[-1]), len(self.cdf) - 1)


def prompt(rng: random.Random, max_chars: int) -> str:
    """Words up to a length drawn uniformly in [8, max_chars] characters (the default tokenizer is bytes)."""
    target = rng.randint(min(8, max_chars), max_chars)
    out = []
    while sum(map(len, out)) + len(out) < target:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:target]


def _safetensors(tensors: dict[str, tuple[list[int], array.array]]) -> bytes:
    """Serialize float32 tensors in the safetensors layout (u64 header length, JSON header, data)."""
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def lora_archive(hidden: int, layers: int, rank: int = 4, seed: int = 0, labels: tuple[str, ...] = ()) -> bytes:
    """A PEFT LoRA upload (ZIP of adapter_config.json + adapter_model.safetensors) on q_proj of every
    layer; q_proj is [hidden, hidden] in every Llama-family model, so hidden size and layers suffice.
    With `labels`, it also carries a classification head (PEFT SEQ_CLS, `score` in modules_to_save)."""
    rng = random.Random(seed)

    def randn(count: int, std: float = 0.05) -> array.array:
        return array.array("f", (rng.gauss(0.0, std) for _ in range(count)))

    tensors = {}
    for i in range(layers):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = ([rank, hidden], randn(rank * hidden))
        tensors[f"{prefix}.lora_B.weight"] = ([hidden, rank], randn(hidden * rank))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj"], "bias": "none", "base_model_name_or_path": "lorafleet-default"}
    if labels:
        tensors["base_model.model.score.weight"] = ([len(labels), hidden], randn(len(labels) * hidden, 0.2))
        config.update(task_type="SEQ_CLS", modules_to_save=["score"], lorafleet={"labels": list(labels)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", json.dumps(config))
        zf.writestr("adapter_model.safetensors", _safetensors(tensors))
    return buf.getvalue()


def upload_messages(name: str, archive: bytes, chunk: int = 64 * 1024) -> Iterator[pb.UploadAdapterRequest]:
    """The UploadAdapter client stream: metadata (with the sha256 for the server to verify), then chunks."""
    yield pb.UploadAdapterRequest(metadata=pb.UploadMetadata(
        name=name, kind=pb.ADAPTER_KIND_LORA, sha256=hashlib.sha256(archive).hexdigest(), total_bytes=len(archive)))
    for i in range(0, len(archive), chunk):
        yield pb.UploadAdapterRequest(chunk=archive[i:i + chunk])
