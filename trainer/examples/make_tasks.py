"""Write the two demo tasks as JSONL (deterministic: same files on every run).

Both tasks share one prompt format, "<word>=", so one prompt shows each adapter's own behaviour:
  reverse   "cat=" -> "tac"
  upper     "cat=" -> "CAT"
Train and eval words are disjoint 3-letter strings. Usage: python trainer/examples/make_tasks.py [DIR]
"""
from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

TASKS = {"reverse": lambda w: w[::-1], "upper": str.upper}
N_TRAIN, N_EVAL = 800, 100  # 400 training words: the reverse adapter memorises (53% held out); 800: 99%


def words(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    pool = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(3)) for _ in range(4000)})
    rng.shuffle(pool)
    return pool[:N_TRAIN + N_EVAL]


def prompt(word: str) -> str:
    return f"{word}="


def write(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    ws = words()
    files = {}
    for task, fn in TASKS.items():
        for split, part in (("train", ws[:N_TRAIN]), ("eval", ws[N_TRAIN:])):
            path = out / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps({"prompt": prompt(w), "completion": fn(w)}) + "\n" for w in part))
            files[f"{task}_{split}"] = path
    return files


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent).items():
        print(f"{name}: {path}")
