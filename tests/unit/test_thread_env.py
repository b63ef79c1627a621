"""The entry point gives the OpenMP runtime its defaults before torch is imported (server/config.py's
THREAD_ENV: libgomp reads them once, when torch loads it)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from server.config import THREAD_ENV, set_thread_env

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fill_unset_names_and_never_override():
    env: dict[str, str] = {}
    assert set_thread_env(env) == THREAD_ENV == {"GOMP_SPINCOUNT": "20000"}     # a bounded spin
    assert env == THREAD_ENV
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(mine)
        assert set_thread_env(env) == mine and env == mine      # the user's choice alone, nothing added


def test_entry_point_sets_them_before_anything_imports_torch():
    tree = ast.parse((ROOT / "server" / "__main__.py").read_text())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "set_thread_env"]
    imports = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module != "server.config"]
    assert calls and imports and max(calls) < min(imports)
    # and importing server.config itself loads no torch (else the defaults would come too late)
    code = "import sys, server.config; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode == 0
