"""The committed stubs are exactly what grpcio-tools generates from proto/ now."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["lorafleet_pb2.py", "lorafleet_pb2.pyi", "lorafleet_pb2_grpc.py"]


def test_committed_stubs_are_fresh(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copytree(ROOT / "proto", tmp_path / "proto", dirs_exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iclient/pb=proto", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", "client/pb/lorafleet/v1/lorafleet.proto"],
                   cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "client/pb/lorafleet/v1" / name).read_text()
        committed = (ROOT / "client/pb/lorafleet/v1" / name).read_text()
        assert fresh == committed, f"client/pb/lorafleet/v1/{name} is stale: run `make proto`"
