"""The async client and the `lorafleet` CLI against a real server."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from client import AsyncLoraFleetClient
from tests.serving_fixtures import make_adapter

ROOT = Path(__file__).resolve().parents[2]


def test_async_client_round_trip(server, client, tiny_model_dir, tmp_path):
    d, _ = make_adapter(tiny_model_dir, tmp_path, "lora", seed=21)

    async def go():
        async with AsyncLoraFleetClient(f"127.0.0.1:{server.port}", timeout=30) as c:
            info = await c.upload_adapter(d, "async-lora")
            r = await c.generate("async", max_new_tokens=5, adapter="async-lora")
            pieces = [p async for p in c.generate_stream("async", max_new_tokens=5, adapter="async-lora")]
            names = [a.name for a in await c.list_adapters()]
            got = await c.get_adapter("async-lora")
            deleted = await c.delete_adapter("async-lora")
            return info, r, pieces, names, got, deleted

    info, r, pieces, names, got, deleted = asyncio.run(go())
    assert info.version >= 1 and "async-lora" in names and got.rank > 0
    assert "".join(p.text for p in pieces) == r.text and pieces[-1].finish_reason == r.finish_reason
    assert deleted == list(got.versions)
    assert client.generate("async", max_new_tokens=5).token_ids != r.token_ids


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_walkthrough(server, tiny_model_dir, tmp_path):
    addr = f"127.0.0.1:{server.port}"
    d, _ = make_adapter(tiny_model_dir, tmp_path, "ia3", seed=22)
    r = cli("--server", addr, "upload", str(d), "--name", "cli-ia3")
    assert r.returncode == 0 and "version" in r.stdout, r.stderr
    r = cli("--server", addr, "generate", "--prompt", "hello", "--max-new-tokens", "4", "--adapter", "cli-ia3")
    assert r.returncode == 0 and "finish:" in r.stderr
    r = cli("--server", addr, "adapters", "list")
    assert r.returncode == 0 and "cli-ia3" in r.stdout
    r = cli("--server", addr, "adapters", "get", "cli-ia3")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "cli-ia3"
    r = cli("--server", addr, "info")
    assert r.returncode == 0 and json.loads(r.stdout)["hidden_size"] == 64
    r = cli("--server", addr, "generate", "--prompt", "x", "--adapter", "missing")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = cli("--server", addr, "adapters", "delete", "cli-ia3")
    assert r.returncode == 0 and "deleted versions: 1" in r.stdout


def server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=60)


def test_keys_are_a_server_command(tmp_path):
    keys = tmp_path / "keys.json"
    r = server_cli("keys", "create", "--tenant", "acme", "--file", str(keys))
    assert r.returncode == 0 and r.stdout.startswith("lf_"), r.stderr
    assert json.loads(keys.read_text())["keys"][0]["tenant"] == "acme"
    assert r.stdout.strip() not in keys.read_text()          # only the hash is stored
    r = server_cli("keys", "create", "--tenant", "A", "--file", str(keys))   # a name the rule refuses
    assert r.returncode == 2 and "Traceback" not in r.stderr and "a-z 0-9" in r.stderr
    r = server_cli("keys", "create", "--tenant", "shared", "--file", str(keys))
    assert r.returncode == 2 and "reserved" in r.stderr


def test_tenant_routing_header_is_sent_and_harmless(server):
    from client import LoraFleetClient
    with LoraFleetClient(f"127.0.0.1:{server.port}", tenant="acme", timeout=30) as c:
        assert ("x-tenant", "acme") in c.metadata
        assert c.generate("routed", max_new_tokens=2).completion_tokens >= 1
