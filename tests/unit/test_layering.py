"""The import contract (ARCHITECTURE.md, "Packages in layers"), checked in fresh interpreters:

    client ──▶ lorafleet (stubs + archive) ◀── server ◀── trainer

The client needs only grpcio and protobuf: importing it (and its CLI) loads no torch, no server
and no trainer; the wire-contract package imports none of the three."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("torch", "server", "trainer", "transformers", "safetensors", "numpy")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("statement", [
    "import client",
    "import client.cli",
    "from client import LoraFleetClient, AsyncLoraFleetClient",
    "import lorafleet.archive, lorafleet.v1.lorafleet_pb2_grpc",
])
def test_client_side_loads_no_torch_server_or_trainer(statement):
    leaked = loaded_after(statement) & set(FORBIDDEN)
    assert not leaked, f"`{statement}` imported {sorted(leaked)}"


def test_the_contract_can_fail():
    """The check sees a forbidden import when there is one (so the test above can fail)."""
    assert "torch" in loaded_after("import server.engine.engine")


def test_cli_help_runs_without_torch():
    code = ("import sys, json\nfrom client.cli import build_parser\nbuild_parser().format_help()\n"
            "print(json.dumps('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip()) is False
