"""A 2-process `torchrun` (gloo, CPU) run equals the 1-process run with the same global batch.

Measured: after 6 steps of 16 examples (2 ranks x 2 micro-batches of 4 vs one batch of 16) the
adapters differ by at most 1.2e-7 (weights up to 0.13) and every step's loss agrees to 1e-6.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.trainer_fixtures import lm_files
from trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_process_torchrun_equals_one_process(tiny_model_dir, tmp_path):
    train, _ = lm_files(tmp_path, n_train=120)
    common = ["-m", "trainer", "--method", "lora", "--data", str(train), "--eval-fraction", "0",
              "--base", str(tiny_model_dir), "--max-steps", "6", "--batch-size", "16", "--threads", "1",
              "--device", "cpu", "--quiet", "--dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *common, "--grad-accum", "2",
                           "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(common[2:] + ["--out", str(tmp_path / "one")]) == 0
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and len(one) == 28  # 7 modules x 2 layers x (lora_A, lora_B)
    assert max(t.abs().max().item() for t in one.values()) > 1e-2  # trained, not the zero init
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert not any(p.name.startswith(".export-") for p in (tmp_path / "two").iterdir())
