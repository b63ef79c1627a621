"""Throughput of our engine vs transformers' generate() on the same weights and batch.

32 requests, 32-token prompts, 32 new tokens, greedy, the embedded default model.
Both measured interleaved in one run; prints tokens/s of each and the ratio (target >= 1.5x).

    .venv/bin/python bench/engine_vs_hf.py [--requests 32] [--prompt-tokens 32] [--new-tokens 32] [--repeats 3]
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

from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    done = threading.Semaphore(0)
    outs: dict[int, list[int]] = {}

    def sink_for(i: int):
        def sink(ev):
            outs.setdefault(i, []).extend(ev.token_ids)
            if isinstance(ev, FinishEvent):
                done.release()
        return sink

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(Sequence(str(i), p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), sink_for(i)))
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - t0, [outs[i] for i in range(len(prompts))]


def run_hf(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)  # both ignore EOS
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()                       # as the server does (server/main.py)
    from transformers import LlamaForCausalLM

    model_dir = resolve_model("random-512", Path(tempfile.gettempdir()) / "lorafleet-bench")
    loaded = load_model(model_dir, torch.device("cpu"), torch.float32)
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 259, (args.prompt_tokens - 1,), generator=g).tolist()
               for _ in range(args.requests)]
    engine = Engine(loaded, max_batch_size=args.requests, max_context_tokens=args.prompt_tokens + args.new_tokens + 8,
                    max_queued=args.requests * 2, max_prefill_tokens=args.requests * args.prompt_tokens)
    engine.start()
    run_engine(engine, prompts[:4], 4)           # warm-up both
    run_hf(hf, prompts[:4], 4)
    ours, theirs = [], []
    for _ in range(args.repeats):                # interleaved
        time.sleep(0.5)   # HF runs on this thread, the engine on its own: let the other OpenMP pool go idle
        t, our_tokens = run_engine(engine, prompts, args.new_tokens)
        ours.append(t)
        time.sleep(0.5)
        t, hf_tokens = run_hf(hf, prompts, args.new_tokens)
        theirs.append(t)
    engine.stop()
    same = sum(a == b[:len(a)] for a, b in zip(our_tokens, hf_tokens))
    total = args.requests * args.new_tokens
    o, h = statistics.median(ours), statistics.median(theirs)
    print(f"model: {model_dir.name} (hidden {loaded.model.args.dim}, {loaded.model.args.n_layers} layers), "
          f"{args.requests} requests x {args.prompt_tokens} prompt tokens x {args.new_tokens} new, greedy, "
          f"{args.threads} threads")
    print(f"lorafleet engine : {o:7.3f} s  {total / o:8.1f} tokens/s")
    print(f"HF generate()    : {h:7.3f} s  {total / h:8.1f} tokens/s")
    print(f"identical greedy outputs: {same}/{args.requests}")
    print(f"ratio engine/HF throughput: {h / o:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
