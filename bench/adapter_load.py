"""How fast a new adapter becomes servable, in units of one decode step of a 32-row batch.

  1. upload complete -> first token: after the store has committed a rank-16 LoRA (all 7 targets),
     a request naming it: disk -> host -> device slot, prefill, first token.
  2. host tier -> device slot: copying an adapter already in host memory into a slot.
Both are printed as ratios to one decode step (32 rows) of the same model, measured in the same run
(default: random-512, the 512-hidden seeded random model).

    .venv/bin/python bench/adapter_load.py [--model random-512] [--repeats 5] [--smoke]

--smoke: the tiny model, one measured load, a few steps (seconds; `make test` runs it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mixed_adapters import make_peft  # noqa: E402
from lorafleet.archive import archive_dir  # noqa: E402
from server.adapters.refs import AdapterKey, parse_tenant_ref  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.batch import Segment, make_forward_batch  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.main import build_adapters, keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.model.shape import BaseModelShape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-512", help="model spec as for the server's --model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one measured load: checks it runs (seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.repeats = "tiny", 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()                       # as the server does (server/main.py)
    with tempfile.TemporaryDirectory(prefix="lorafleet-load-") as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    base_dir = resolve_model(args.model, ServerConfig().cache_dir)
    loaded = load_model(base_dir, torch.device("cpu"), torch.float32)
    m = loaded.model
    _store, serving = build_adapters(ServerConfig(data_dir=work / "store", adapter_slots=8, max_adapter_rank=16),
                                     loaded)
    engine = Engine(loaded, 32, 96, 64, 1024, adapters=serving)

    # one decode step of 32 rows (the unit)
    tables = [engine.kv.blocks.allocate(engine.kv.blocks.blocks_for(41)) for _ in range(32)]
    engine.kv.zero_fresh()
    segs = [Segment(t, [7], 40, True) for t in tables]
    batch = make_forward_batch(segs, m.device, engine.kv.block_size)
    for _ in range(3):
        m.forward(batch, engine.kv.layers)
    steps = []
    for _ in range(max(3, args.repeats * 4)):
        t = time.perf_counter()
        m.forward(batch, engine.kv.layers)
        steps.append(time.perf_counter() - t)
    step = statistics.median(steps)

    for t in tables:                       # the engine's own requests need the pool
        engine.kv.blocks.release(t)
    engine.start()
    archives = [archive_dir(make_peft(base_dir, work / f"l{i}", "lora", i)) for i in range(args.repeats + 1)]
    first_token = []
    for i, archive in enumerate(archives):
        info = serving.registry.put("bench", f"new{i}", archive)          # upload complete
        got = threading.Event()
        t0 = time.perf_counter()
        ref = serving.registry.resolve(parse_tenant_ref("bench", f"new{i}"))
        engine.submit(Sequence("b", [1, 5, 6, 7, 8, 9, 10, 11], SamplingParams(max_new_tokens=1, ignore_eos=True),
                               lambda ev: got.set(), tenant="bench"), ref)
        got.wait(60)
        if i:                                                            # the first one warms up
            first_token.append(time.perf_counter() - t0)
        assert info.version == 1
    engine.stop()

    weights = serving.registry.load(AdapterKey("bench", "new0", 1))
    copies = []
    for _ in range(max(3, args.repeats * 4)):
        t = time.perf_counter()
        serving.slots.write(7, weights)
        copies.append(time.perf_counter() - t)
    copy = statistics.median(copies)
    ft = statistics.median(first_token)
    shape = BaseModelShape.from_hf_config(loaded.hf_config)
    print(f"model {base_dir.name} ({shape.hidden_size} hidden, {shape.num_layers} layers), rank-16 LoRA on "
          f"all 7 targets, {args.threads} threads, median of {len(first_token)} loads")
    print(f"one decode step, 32 rows          : {step * 1e3:8.2f} ms   (the unit)")
    print(f"upload complete -> first token    : {ft * 1e3:8.2f} ms")
    print(f"host tier -> device slot (copy)   : {copy * 1e3:8.2f} ms")
    print(f"ratio: upload complete -> first token / decode step = {ft / step:.2f}")
    print(f"ratio: host tier -> device slot copy / decode step = {copy / step:.2f}")


if __name__ == "__main__":
    main()
