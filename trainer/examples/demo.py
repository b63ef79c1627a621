"""Demo: two tenants train a LoRA each on the real default model, and one server mixes them in one batch.

  1. write the data (demo_tasks.py): simple factual questions; tenant A's answers are a JSON object
     ({"answer": "Tokyo"}), tenant B's a pirate's (Arr, the capital of Japan be Tokyo, matey!)
  2. start a server on SmolLM2-135M-Instruct with an API key per tenant
  3. each tenant runs `lorafleet train --chat ... --upload` (the prompt rendered by the model's chat
     template, exactly as `lorafleet chat` sends it), which uploads the adapter under its own key
  4. ONE concurrent mixed batch of chat requests on held-out questions: the base model, tenant A's
     adapter and tenant B's adapter for every question, all in flight at once
  5. the answers side by side, and each adapter's score against the base model's on the same questions

Bounded for a 2-core CPU: 10 + 12 training steps of 8 examples (5 s a step on 2 idle cores, 12 s when
other work shares them), then under a minute of serving.
Usage: python trainer/examples/demo.py [--steps N] [--work DIR] [--base DIR] [--rows 12]
       [--dtype bfloat16] [--quantize int8] [--no-train: reuse the adapters of an earlier --work DIR]
"""
from __future__ import annotations

import os

# Two OpenMP threads that spin-wait are ~7x slower than one thread when another process shares the
# cores (measured: 80 s vs 11 s per step); passive waiting keeps two threads ahead. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the checkout

from trainer.examples.demo_tasks import write  # noqa: E402


@dataclass(frozen=True)
class Tenant:
    name: str  # the tenant (API key owner)
    adapter: str  # the adapter it trains and uploads
    task: str  # demo_tasks.TASKS key
    steps: int  # optimizer steps of 8 examples
    key: str  # its API key


MAX_NEW = 32  # tokens per answer: enough for a sentence; the base model's longer answers are cut


def log(message: str) -> None:
    print(f"demo: {message}", flush=True)


def train_argv(t: Tenant, files: dict[str, Path], base: Path, out: Path, server: str) -> list[str]:
    """`lorafleet train` flags for one tenant's adapter."""
    return ["--method", "lora", "--chat", "--data", str(files[f"{t.task}_train"]), "--eval-fraction", "0",
            "--base", str(base), "--out", str(out), "--rank", "8", "--alpha", "16", "--lr", "3e-3",
            "--max-steps", str(t.steps), "--batch-size", "8", "--warmup-steps", "2", "--max-length", "96",
            "--upload", "--name", t.adapter, "--server", server, "--api-key", t.key]


def train(t: Tenant, argv: list[str]) -> None:
    from trainer.cli import main as train_main

    shown = " ".join(a if not a.startswith("lf_") else "$KEY" for a in argv)
    log(f"tenant {t.name} trains {t.adapter!r}: lorafleet train {shown}")
    t0 = time.perf_counter()
    if train_main(argv) != 0:
        raise SystemExit(f"demo: training or uploading {t.name}'s adapter failed")
    log(f"tenant {t.name}: trained and uploaded {t.adapter!r} in {time.perf_counter() - t0:.0f}s")


def held_out(files: dict[str, Path]) -> list[tuple[str, str]]:
    """[(question, fact)] of the held-out split."""
    rows = [json.loads(line) for line in files["json_eval"].read_text().splitlines()]
    return [(r["prompt"], r["fact"]) for r in rows]


def mixed_batch(addr: str, tenants: list[Tenant], questions: list[str]) -> dict[tuple[str, str], str]:
    """{(column, question): answer}: base and every tenant's adapter, all requests in flight at once."""
    from client import LoraFleetClient

    clients = {t.name: LoraFleetClient(addr, api_key=t.key, timeout=600) for t in tenants}
    jobs = [(col, q, t) for q in questions
            for col, t in [("base", tenants[0]), *[(t.adapter, t) for t in tenants]]]
    log(f"one mixed batch: {len(jobs)} concurrent chat requests (base, "
        + ", ".join(f"{t.name}/{t.adapter}" for t in tenants) + f") on {len(questions)} held-out questions")
    got: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {pool.submit(clients[t.name].chat, [("user", q)], adapter="" if col == "base" else col,
                               max_new_tokens=MAX_NEW, temperature=0.0): (col, q) for col, q, t in jobs}
        for n, f in enumerate(as_completed(futures), 1):
            got[futures[f]] = f.result().text.strip()
            if n % 12 == 0 or n == len(jobs):
                log(f"  {n}/{len(jobs)} answers back ({time.perf_counter() - t0:.0f}s)")
    for c in clients.values():
        c.close()
    return got


def is_json_answer(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"answer"} and isinstance(obj["answer"], str)


def is_pirate(text: str) -> bool:
    return text.startswith("Arr, ") and text.endswith(", matey!")


SCORES = {"valid JSON {\"answer\": ...}": lambda a, fact: is_json_answer(a),
          "pirate form (Arr, ... matey!)": lambda a, fact: is_pirate(a),
          "names the right fact": lambda a, fact: fact.lower() in a.lower()}


def cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def print_table(got: dict[tuple[str, str], str], columns: list[str], facts: list[tuple[str, str]], rows: int) -> None:
    widths = [30, 30, 20, 52][:len(columns) + 1]
    head = ["question", *columns]
    print("\n" + " | ".join(f"{h:<{w}}" for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for q, _ in facts[:rows]:
        cells = [q, *[got[(c, q)] for c in columns]]
        print(" | ".join(f"{cut(x, w):<{w}}" for x, w in zip(cells, widths)))


def score(got: dict[tuple[str, str], str], columns: list[str], facts: list[tuple[str, str]]) -> dict:
    """{score name: {column: share of held-out answers}}."""
    return {name: {c: sum(fn(got[(c, q)], fact) for q, fact in facts) / len(facts) for c in columns}
            for name, fn in SCORES.items()}


def print_scores(scores: dict, columns: list[str], n: int) -> None:
    print(f"\nscores on {n} held-out questions (greedy)")
    print(f"  {'':<32}" + "".join(f"{c:>12}" for c in columns))
    for name, row in scores.items():
        print(f"  {name:<32}" + "".join(f"{row[c]:>12.0%}" for c in columns))


def start_server(base: Path, work: Path, keys: Path, batch: int, dtype: str = "auto", quantize: str = "none"):
    from server.config import ServerConfig
    from server.main import BackgroundServer, load

    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, model=str(base), data_dir=work / "server-data",
                       cache_dir=work / "models", api_keys=keys, max_batch_size=batch, max_context_tokens=128,
                       max_prompt_tokens=96, max_new_tokens=MAX_NEW, max_queued_requests=4 * batch, dtype=dtype,
                       quantize=quantize)
    return BackgroundServer(cfg, load(cfg))


def make_tenants(keys: Path, steps: int) -> list[Tenant]:
    """Measured on the held-out questions: 10 steps give 100% valid JSON, 12 steps 100% pirate form."""
    from server.api.auth import create_key

    return [Tenant("acme", "json", "json", steps or 10, create_key(keys, "acme", False)),
            Tenant("globex", "pirate", "pirate", steps or 12, create_key(keys, "globex", False))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps (of 8 examples) for each adapter (default: 10 for json, 12 for pirate)")
    p.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    p.add_argument("--base", type=Path, help="base model directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--rows", type=int, default=12, help="held-out questions shown in the table (default 12)")
    p.add_argument("--dtype", default="auto", help="the server's --dtype (auto, float32, bfloat16)")
    p.add_argument("--quantize", default="none", help="the server's --quantize (none, int8)")
    p.add_argument("--no-train", action="store_true",
                   help="serve the adapters an earlier run with the same --work uploaded (no training)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    work = a.work or Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.base is None:
        from server.model.default import resolve_model
        from trainer.cli import DEFAULT_MODELS
        a.base = resolve_model(None, DEFAULT_MODELS)
    files = write(work / "data")
    facts = held_out(files)
    keys = work / "keys.json"
    keys.unlink(missing_ok=True)
    tenants = make_tenants(keys, a.steps)
    log(f"work dir {work}; base model {a.base.name}; tenants " + ", ".join(t.name for t in tenants))
    with start_server(a.base, work, keys, batch=len(facts) * (len(tenants) + 1), dtype=a.dtype,
                      quantize=a.quantize) as running:
        addr = f"127.0.0.1:{running.port}"
        log(f"server on {addr} (API keys in {keys}; --dtype {a.dtype} --quantize {a.quantize})")
        for t in tenants if not a.no_train else ():
            train(t, train_argv(t, files, a.base, work / "adapters" / t.adapter, addr))
        columns = ["base", *[t.adapter for t in tenants]]
        got = mixed_batch(addr, tenants, [q for q, _ in facts])
    print_table(got, columns, facts, a.rows)
    print_scores(score(got, columns, facts), columns, len(facts))
    log(f"total wall time {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
