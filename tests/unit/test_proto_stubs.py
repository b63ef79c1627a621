"""The committed stubs are exactly what grpcio-tools generates from proto/ now."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["lorafleet_pb2.py", "lorafleet_pb2.pyi", "lorafleet_pb2_grpc.py"]


def test_committed_stubs_are_fresh(tmp_path):
    shutil.copy(ROOT / "proto/lorafleet/v1/lorafleet.proto", tmp_path / "lorafleet.proto")
    (tmp_path / "lorafleet/v1").mkdir(parents=True)
    shutil.copy(ROOT / "proto/lorafleet/v1/lorafleet.proto", tmp_path / "lorafleet/v1/lorafleet.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "lorafleet/v1/lorafleet.proto"], cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "lorafleet/v1" / name).read_text()
        committed = (ROOT / "proto/lorafleet/v1" / name).read_text()
        assert fresh == committed, f"proto/lorafleet/v1/{name} is stale: run `make proto`"
