"""Checkpoints: safetensors for every tensor, JSON for everything else; never pickle, never torch.load.

OUT/checkpoints/step-00000050/
  adapter.safetensors    trainable parameters by name (adapter, and head for cls)
  optimizer.safetensors  AdamW state tensors as "state.{param index}.{key}"
  rng.safetensors        "cpu.{rank}" (and "cuda.{rank}") generator states of every rank
  best.safetensors       trainable parameters at the best evaluation so far (when there is one)
  state.json             step, schedule, early-stopping state, optimizer param groups and non-tensor
                         state, parameter names in optimizer order, the adapter's shape
Written into a temporary directory then renamed, so a crash never leaves a half checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.config import TrainError

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass
class Checkpoint:
    step: int
    adapter: dict[str, torch.Tensor]  # parameter name -> tensor
    optimizer: dict  # an optimizer.state_dict() ready for load_state_dict
    rng: dict[str, torch.Tensor]  # "cpu.{rank}" / "cuda.{rank}" -> uint8 state
    best: dict[str, torch.Tensor] | None
    state: dict  # state.json


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def optimizer_to_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = v
            else:
                scalars.setdefault(str(idx), {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return _tensors(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save(out: Path, step: int, adapter: dict[str, torch.Tensor], optimizer_state: dict,
         rng: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None, state: dict, keep: int) -> Path:
    """Write checkpoint `step` under OUT/checkpoints and keep only the newest `keep` (rank 0 only)."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, opt_meta = optimizer_to_files(optimizer_state)
    save_file(_tensors(adapter), str(tmp / "adapter.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(_tensors(rng), str(tmp / "rng.safetensors"))
    if best is not None:
        save_file(_tensors(best), str(tmp / "best.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str, out: Path) -> Path | None:
    """--resume (no value) -> the newest checkpoint under OUT, or None; --resume DIR -> DIR, checked."""
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainError(f"--resume {resume}: not a checkpoint directory (no state.json)")
    return path


def load(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
        return Checkpoint(step=int(state["step"]), adapter=load_file(str(path / "adapter.safetensors")),
                          optimizer=optimizer_from_files(load_file(str(path / "optimizer.safetensors")),
                                                         state["optimizer"]),
                          rng=load_file(str(path / "rng.safetensors")), best=best, state=state)
    except (OSError, KeyError, ValueError) as e:
        raise TrainError(f"{path}: unreadable checkpoint ({str(e)[:200]})") from None
