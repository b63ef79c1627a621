"""Every bench runs end to end in `make test` (issue 21): benches that nothing runs rot unseen.

The benches are discovered (`bench/*.py`), so a new one is covered the day it lands. Each is run as a
subprocess with `--smoke` (the tiny model, a few steps, the same code path as its full run) under a
deadline, and must exit 0 and print at least one ratio line: a line starting `ratio:` that holds at
least one `NAME = NUMBER` figure, finite (bench/README.md). The full runs stay manual (`make bench`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
DEADLINE_S = 120        # per bench; each takes 2-25 s on a shared 2-core machine
FIGURE = re.compile(r"=\s*-?\d+(\.\d+)?")
NOT_FINITE = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def ratio_lines(stdout: str) -> list[str]:
    """The ratio lines of a bench's output; AssertionError for one whose figures are not finite."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("ratio:") and FIGURE.search(ln)]
    bad = [ln for ln in lines if NOT_FINITE.search(ln)]
    assert not bad, f"ratio lines with a figure that is not finite: {bad}"
    return lines


def test_the_benches_are_found():
    names = {p.stem for p in BENCHES}
    assert {"adapter_load", "engine_vs_hf", "adapter_kernels", "mixed_adapters"} <= names, names


def test_no_bench_shadows_an_installed_module():
    """A bench runs with bench/ first on sys.path, so a bench named like a package shadows it for
    every library the bench imports (bench/kernels.py broke transformers 5.25, whose hub_kernels
    imports the `kernels` package when it finds one, on a clean CI install)."""
    import importlib.util
    shadowing = [p.name for p in (ROOT / "bench").glob("*.py")
                 if p.stem not in sys.builtin_module_names and importlib.util.find_spec(p.stem) is not None
                 and Path(importlib.util.find_spec(p.stem).origin or "").parent != ROOT / "bench"]
    assert not shadowing, f"rename these benches: each is also an importable module's name: {shadowing}"


def test_the_ratio_check_can_fail():
    line = "ratio: engine / HF = 1.37 (target >= 1.5)"
    assert ratio_lines(f"x\n{line}\n") == [line]
    assert ratio_lines("speedup 3.1x\nratio of the two: high\n  ratio: a = 2\n") == []
    with pytest.raises(AssertionError, match="not finite"):
        ratio_lines("ratio: (c)/(a) = 0.63, (d)/(a) = nan\n")


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.stem)
def test_bench_smoke_runs_and_prints_its_ratio(bench: Path, tmp_path: Path):
    assert '"--smoke"' in bench.read_text(), f"{bench.name} has no --smoke flag (every bench needs one: bench/README)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")]), "TMPDIR": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)                      # gpu_check writes its report there
    try:
        p = subprocess.run([sys.executable, str(bench), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{bench.name} --smoke ran past {DEADLINE_S} s; its output so far:\n{out[-3000:]}")
    tail = (p.stdout[-3000:] + "\n--- stderr ---\n" + p.stderr[-3000:])
    assert p.returncode == 0, f"{bench.name} --smoke exited {p.returncode}:\n{tail}"
    assert ratio_lines(p.stdout), f"{bench.name} --smoke printed no ratio line ('ratio: NAME = NUMBER'):\n{tail}"
