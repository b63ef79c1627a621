"""Demo: train two LoRA adapters on the default model, serve both from one server, mix them in one batch.

  1. write the two tasks (make_tasks.py): "cat=" -> "tac" (reverse) and "cat=" -> "CAT" (upper)
  2. train one LoRA adapter per task with the trainer's CLI (200 steps of 32 examples: 35-70 s each
     on 2 CPU cores)
  3. exact match on the held-out words, in-process: base vs each adapter (greedy)
  4. (unless --train-only) start a server, upload both adapters, send ONE concurrent mixed batch
     (base, reverse and upper requests for the same prompts) and print what each row got back,
     and each adapter's exact match as served.

Usage: python trainer/examples/demo.py [--train-only] [--steps 200] [--work DIR] [--base DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the checkout

from trainer.cli import DEFAULT_MODELS, main as train_main  # noqa: E402
from trainer.data import Tokens  # noqa: E402
from trainer.examples.make_tasks import TASKS, write  # noqa: E402
from trainer.generate import greedy  # noqa: E402
from trainer.methods import AdapterModule, load_adapter, load_base, read_model_config  # noqa: E402

MAX_NEW = 4  # three letters and EOS


def train(task: str, files: dict[str, Path], base: Path, out: Path, steps: int, seed: int) -> None:
    argv = ["--method", "lora", "--task", "lm", "--data", str(files[f"{task}_train"]),
            "--eval", str(files[f"{task}_eval"]), "--base", str(base), "--out", str(out),
            "--rank", "8", "--alpha", "16", "--max-steps", str(steps), "--batch-size", "32",
            "--lr", "3e-3", "--warmup-steps", "10", "--eval-every", str(max(1, steps // 4)), "--seed", str(seed)]
    t0 = time.perf_counter()
    if train_main(argv) != 0:
        raise SystemExit(f"demo: training the {task} adapter failed")
    print(f"demo: trained {task} in {time.perf_counter() - t0:.0f}s -> {out}", flush=True)


def exact_match(outputs: list[str], expected: list[str]) -> float:
    return sum(o.strip() == e for o, e in zip(outputs, expected)) / len(expected)


def eval_words(files: dict[str, Path]) -> list[str]:
    import json

    return [json.loads(line)["prompt"][:-1] for line in files["reverse_eval"].read_text().splitlines()]


def local_accuracy(base: Path, adapters: dict[str, Path], words: list[str]) -> dict[str, dict[str, float]]:
    """{model: {task: exact match}} for the base and each adapter, run in-process."""
    cfg = read_model_config(base)
    tokens = Tokens.load(base, cfg)
    prompts = [f"{w}=" for w in words]
    models = {"base": AdapterModule(load_base(base, "lm", (), tokens.pad_id), "none", "lm").eval()}
    for name, d in adapters.items():
        models[name] = load_adapter(load_base(base, "lm", (), tokens.pad_id), d, "lm", cfg)
    table = {}
    for name, module in models.items():
        outs = greedy(module, tokens, prompts, MAX_NEW)
        table[name] = {task: exact_match(outs, [fn(w) for w in words]) for task, fn in TASKS.items()}
    return table


def print_accuracy(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n  {'model':<10}" + "".join(f"{t + ' task':>14}" for t in TASKS))
    for name, row in table.items():
        print(f"  {name:<10}" + "".join(f"{row[t]:>14.0%}" for t in TASKS))


def serve_and_mix(base: Path, adapters: dict[str, Path], words: list[str], work: Path) -> None:
    from client import LoraFleetClient
    from server.config import ServerConfig
    from server.main import BackgroundServer, load

    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, model_dir=base, data_dir=work / "server-data")
    with BackgroundServer(cfg, load(cfg)) as running:
        with LoraFleetClient(f"127.0.0.1:{running.port}") as client:
            for name, d in adapters.items():
                client.upload_adapter(d, name)
                print(f"demo: uploaded {name}")
            jobs = [(name, w) for w in words for name in ["", *adapters]]  # interleaved: every batch is mixed
            with ThreadPoolExecutor(max_workers=32) as pool:
                results = list(pool.map(lambda job: client.generate(f"{job[1]}=", adapter=job[0],
                                                                    max_new_tokens=MAX_NEW).text, jobs))
    got = {(name, w): text for (name, w), text in zip(jobs, results)}
    print(f"\none mixed batch of {len(jobs)} concurrent requests; the first rows:")
    print(f"  {'prompt':<8}{'base':>10}" + "".join(f"{n:>10}" for n in adapters))
    for w in words[:8]:
        print(f"  {w + '=':<8}{got[('', w)]!r:>10}" + "".join(f"{got[(n, w)]!r:>10}" for n in adapters))
    table = {("base" if n == "" else n): {t: exact_match([got[(n, w)] for w in words], [fn(w) for w in words])
                                           for t, fn in TASKS.items()} for n in ["", *adapters]}
    print_accuracy("exact match as served (held-out words)", table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-only", action="store_true", help="train and measure in-process; start no server")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per adapter (default 200)")
    p.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    p.add_argument("--base", type=Path, help="base model directory (default: the embedded default model)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    if a.base is None:
        from server.model.default import resolve_model
        a.base = resolve_model("random-512", DEFAULT_MODELS)
    files = write(work / "data")
    adapters = {task: work / "adapters" / task for task in TASKS}
    for i, (task, out) in enumerate(adapters.items()):
        train(task, files, a.base, out, a.steps, seed=i)
    words = eval_words(files)
    print_accuracy("exact match in-process (held-out words, greedy)", local_accuracy(a.base, adapters, words))
    if not a.train_only:
        serve_and_mix(a.base, adapters, words, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
