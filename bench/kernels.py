"""Benchmark of the batched adapter kernels against per-adapter baselines (CPU).

    .venv/bin/python bench/kernels.py [--quick]

fp32, torch threads = 2, one stacked adapter store of 64 slots. For each case
it times, as medians of interleaved repeats in one run:

* ``base``   the base matmul ``x @ W^T`` alone (the baseline of every ratio)
* ``lora``   our batched path ``server.kernels.lora`` (plan built outside the
  timed region, as the engine builds it once per step for all layers; its
  cost is reported separately as ``plan``)
* ``loop``   PEFT's ``_mixed_batch_forward``: for each unique adapter, take its
  rows, ``B(A(x[rows])) * scale``, add back (row index lists precomputed,
  which flatters it: PEFT rebuilds them in every layer)
* ``gather`` naive BGMV: gather a weight copy per token, then two bmm

and prints ``lora/base`` (overhead) and ``loop/lora``, ``gather/lora``
(speedups). The heterogeneous-rank cases (half the adapters rank 4, half 64)
compare rank buckets with padding every row to r_max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.kernels import lora, make_plan  # noqa: E402

NUM_SLOTS = 64


def timeit(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each fn, measured interleaved (fn1, fn2, ..., fn1, ...)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_slots(kind: str, n_adapters: int, gen: torch.Generator) -> torch.Tensor:
    """[T] slot per row. Adapters sit in random slots of the 64-slot store."""
    used = torch.randperm(NUM_SLOTS, generator=gen)[:n_adapters]
    if kind == "decode":  # 64 tokens, one per sequence, arbitrary order
        if n_adapters == 64:
            return used
        return used[torch.randint(0, n_adapters, (64,), generator=gen)]
    return used[torch.arange(8)].repeat_interleave(256)  # prefill: 8 seqs x 256


def peft_loop(y, x, A, B, scale, groups) -> None:
    for s, r, idx in groups:  # PEFT: sub-batch per adapter, then add back
        sub = x[idx]
        y[idx] += F.linear(F.linear(sub, A[s, :r]), B[s, :, :r]) * scale[s]


def gather_bmm(y, x, A, B, scale, slots) -> None:
    Ag, Bg = A[slots], B[slots]  # a weight copy per token
    v = torch.bmm(x.unsqueeze(1), Ag.transpose(1, 2)) * scale[slots].view(-1, 1, 1)
    y += torch.bmm(v, Bg.transpose(1, 2)).squeeze(1)


def run_case(d: int, kind: str, n_adapters: int, ranks: torch.Tensor, reps: int,
             hetero: bool, gen: torch.Generator) -> dict[str, float]:
    r_max = int(ranks.max())
    slots = make_slots(kind, n_adapters, gen)
    T = slots.numel()
    x, W = torch.randn(T, d), torch.randn(d, d) / d**0.5
    A, B = torch.randn(NUM_SLOTS, r_max, d) / d**0.5, torch.randn(NUM_SLOTS, d, r_max)
    scale = torch.rand(NUM_SLOTS)
    y = torch.zeros(T, d)
    plan = make_plan(slots, ranks)
    fns = {"base": lambda: F.linear(x, W), "lora": lambda: lora(y, x, A, B, scale, plan)}
    if hetero:
        padded = make_plan(slots, ranks, rank_buckets=False)
        fns["padded"] = lambda: lora(y, x, A, B, scale, padded)
    else:
        groups = [(s, int(ranks[s]), (slots == s).nonzero().flatten().tolist())
                  for s in slots.unique().tolist()]
        fns["loop"] = lambda: peft_loop(y, x, A, B, scale, groups)
        fns["gather"] = lambda: gather_bmm(y, x, A, B, scale, slots)
    fns["plan"] = lambda: make_plan(slots, ranks)
    return timeit(fns, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reps = 15 if args.quick else 50
    uniform = torch.full((NUM_SLOTS,), 16)
    mixed = torch.tensor([4, 64] * (NUM_SLOTS // 2))  # slot parity decides rank
    print(f"fp32 CPU, {torch.get_num_threads()} threads, {NUM_SLOTS} slots, median of {reps}")
    print(f"{'case':<28}{'base ms':>9}{'lora ms':>9}{'plan us':>9}"
          f"{'lora/base':>11}{'loop/lora':>11}{'gather/lora':>12}")
    for d in (4096, 512):
        for kind, n in (("decode", 64), ("decode", 8), ("prefill", 8)):
            t = run_case(d, kind, n, uniform, reps if d == 512 else reps // 2 + 1, False, gen)
            label = f"d={d} {kind} T={64 if kind == 'decode' else 2048} {n} ad"
            print(f"{label:<28}"
                  f"{t['base'] * 1e3:9.3f}{t['lora'] * 1e3:9.3f}{t['plan'] * 1e6:9.0f}"
                  f"{t['lora'] / t['base']:10.1%}{t['loop'] / t['lora']:10.1f}x"
                  f"{t['gather'] / t['lora']:11.1f}x")
    print(f"\nheterogeneous ranks (half 4, half 64): rank buckets vs padding to r_max=64")
    print(f"{'case':<28}{'base ms':>9}{'bucket ms':>10}{'padded ms':>10}"
          f"{'bucket/base':>12}{'padded/base':>12}{'padded/bucket':>14}")
    for d in (4096, 512):
        for kind, n in (("decode", 64), ("prefill", 8)):
            t = run_case(d, kind, n, mixed, reps if d == 512 else reps // 2 + 1, True, gen)
            label = f"d={d} {kind} {n} ad"
            print(f"{label:<28}{t['base'] * 1e3:9.3f}{t['lora'] * 1e3:10.3f}"
                  f"{t['padded'] * 1e3:10.3f}{t['lora'] / t['base']:11.1%}"
                  f"{t['padded'] / t['base']:11.1%}{t['padded'] / t['lora']:13.2f}x")


if __name__ == "__main__":
    main()
