"""Provision a load-test fleet: N tenants with API keys, one uploaded adapter each.

The keys file must exist before the server starts (`--api-keys`); the adapters are uploaded over
gRPC once it serves. Every adapter is a rank-r LoRA on q_proj with a 3-label classification head,
so the same adapter serves Generate, GenerateStream and Classify.
"""
from __future__ import annotations

from pathlib import Path

import grpc

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from loadtest.traffic import LABELS, Tenant, lora_archive, upload_messages

ADAPTER = "a0"


def create_keys(keys_file: Path, n: int) -> list[tuple[str, str]]:
    """(tenant, key) for tenants t000..t{n-1}, appended to `keys_file` (hashes only are stored)."""
    from server.api.auth import create_key
    return [(f"t{i:03d}", create_key(keys_file, f"t{i:03d}", admin=False)) for i in range(n)]


def upload_adapters(target: str, tenant_keys: list[tuple[str, str]], rank: int = 8,
                    timeout: float = 60.0) -> list[Tenant]:
    """Upload one adapter (different weights) per tenant; returns the tenants, most popular first."""
    with grpc.insecure_channel(target) as ch:
        inference, adapters = pb_grpc.InferenceStub(ch), pb_grpc.AdaptersStub(ch)
        tenants = []
        for i, (tenant, key) in enumerate(tenant_keys):
            md = (("authorization", f"Bearer {key}"), ("x-tenant", tenant))
            if i == 0:
                info = inference.GetServerInfo(pb.GetServerInfoRequest(), metadata=md, timeout=timeout)
            archive = lora_archive(info.hidden_size, info.num_layers, rank=rank, seed=i, labels=LABELS)
            adapters.UploadAdapter(upload_messages(ADAPTER, archive), metadata=md, timeout=timeout)
            tenants.append(Tenant(tenant, key, ADAPTER))
    return tenants
