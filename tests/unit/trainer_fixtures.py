"""Shared helpers for the trainer tests: small synthetic JSONL tasks and a TrainConfig on the tiny model.

lm:  the demo's reverse task ("cat=" -> "tac"), 200 training / 50 eval lines
cls: 5-character strings labelled by their last character: digit | lower | upper
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

from trainer.config import DataSource, TrainConfig
from trainer.examples.make_tasks import write

CLS_CLASSES = {"digit": string.digits, "lower": string.ascii_lowercase, "upper": string.ascii_uppercase}


def lm_files(root: Path, task: str = "reverse", n_train: int = 200, n_eval: int = 50) -> tuple[Path, Path]:
    files = write(root / "tasks")
    train, ev = root / f"{task}_train.jsonl", root / f"{task}_eval.jsonl"
    train.write_text("".join(files[f"{task}_train"].read_text().splitlines(keepends=True)[:n_train]))
    ev.write_text("".join(files[f"{task}_eval"].read_text().splitlines(keepends=True)[:n_eval]))
    return train, ev


def cls_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(CLS_CLASSES))
        text = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(4)) \
            + rng.choice(CLS_CLASSES[label])
        rows.append({"text": text, "label": label})
    return rows


def cls_files(root: Path, n_train: int = 240, n_eval: int = 60) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    train, ev = root / "cls_train.jsonl", root / "cls_eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in cls_rows(n_train, 1)))
    ev.write_text("".join(json.dumps(r) + "\n" for r in cls_rows(n_eval, 2)))
    return train, ev


def config(model_dir: Path, out: Path, train: Path, ev: Path | None, **kw) -> TrainConfig:
    base = dict(method="lora", task="lm", data=(DataSource(train, 1.0),), eval_path=ev, out=out, base=model_dir,
                max_steps=30, batch_size=16, seed=0, quiet=True, threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)
