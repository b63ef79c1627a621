"""Benchmark of the batched adapter kernels against per-adapter baselines (CPU).

    .venv/bin/python bench/adapter_kernels.py [--quick] [--keep-freed-memory] [--smoke]

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
* ``read``   just streaming every slot's A and B once (``sum``), in the 64-adapter
  cases: the memory-traffic floor of any exact fp32 kernel

and prints ``lora/base`` (overhead) and ``loop/lora``, ``gather/lora``
(speedups), plus the path the plan chose. The heterogeneous-rank cases (half
the adapters rank 4, half 64) compare rank buckets with padding every row to
r_max. ``noise`` is p90/p10 of the base timings: on a shared machine, rerun
when it is far above 1. ``--quick``: 15 repeats instead of 40. ``--smoke``: the
d=512 cases only, 2 repeats (a few seconds; ``make test`` runs it).
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
from server.kernels import lora, make_plan, torch_ops  # noqa: E402

NUM_SLOTS = 64


def timeit(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each fn, measured interleaved (fn1, fn2, ..., fn1, ...);
    key "noise": p90/p10 of the first fn (near 1.0 on a quiet machine)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    first = sorted(next(iter(times.values())))
    noise = first[int(0.9 * (len(first) - 1))] / first[int(0.1 * (len(first) - 1))]
    return {k: statistics.median(v) for k, v in times.items()} | {"noise": noise}


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


def path_of(plan, d: int) -> str:
    """Which execution path the plan takes for a d x d lora (for the table)."""
    names = ["segments"] * bool(plan.segments)
    for bk in plan.buckets:
        kind = "view" if bk.first_slot >= 0 else "gather"
        names.append(f"r{bk.rank}:" + ("loop" if torch_ops._loop(plan, bk, 2 * d, 2) else f"{kind}-bmm"))
    return ",".join(names)


def run_case(d: int, kind: str, n_adapters: int, ranks: torch.Tensor, reps: int,
             hetero: bool, gen: torch.Generator) -> tuple[dict[str, float], str]:
    """Median seconds per method (interleaved) and the path our plan took."""
    r_max = int(ranks.max())
    slots = make_slots(kind, n_adapters, gen)
    T = slots.numel()
    x, W = torch.randn(T, d), torch.randn(d, d) / d**0.5
    A, B = torch.randn(NUM_SLOTS, r_max, d) / d**0.5, torch.randn(NUM_SLOTS, d, r_max)
    scale = torch.rand(NUM_SLOTS)
    y = torch.zeros(T, d)
    plan = make_plan(slots, ranks)
    fns = {"base": lambda: F.linear(x, W), "lora": lambda: lora(y, x, A, B, scale, plan)}
    if hetero:  # a rank-unaware kernel: every slot computed at r_max
        padded = make_plan(slots, torch.full_like(ranks, r_max))
        fns["padded"] = lambda: lora(y, x, A, B, scale, padded)
    else:
        groups = [(s, int(ranks[s]), (slots == s).nonzero().flatten().tolist())
                  for s in slots.unique().tolist()]
        fns["loop"] = lambda: peft_loop(y, x, A, B, scale, groups)
        if kind == "decode":  # per token weight copies: 2048 of them in prefill
            fns["gather"] = lambda: gather_bmm(y, x, A, B, scale, slots)
    if slots.unique().numel() == NUM_SLOTS:  # the floor: stream every A and B once
        fns["read"] = lambda: (A.sum(), B.sum())
    fns["plan"] = lambda: make_plan(slots, ranks)
    times = timeit(fns, reps)
    return times, path_of(plan, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--smoke", action="store_true", help="d=512 only, 2 repeats: checks it runs")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="tune glibc malloc to reuse freed buffers, as the server does "
                         "(server.main.keep_freed_memory)")
    args = ap.parse_args()
    if args.keep_freed_memory:
        from server.main import keep_freed_memory
        keep_freed_memory()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reps = 2 if args.smoke else 15 if args.quick else 40
    dims = (512,) if args.smoke else (4096, 512)
    uniform = torch.full((NUM_SLOTS,), 16)
    half = NUM_SLOTS // 2
    mixed = {"interleaved": torch.tensor([4, 64] * half),  # slot parity decides rank
             "grouped": torch.tensor([4] * half + [64] * half)}  # rank classes in slot ranges
    print(f"fp32 CPU, {torch.get_num_threads()} threads, {NUM_SLOTS} slots, r=16, "
          f"median of {reps} interleaved repeats (d=4096: fewer), "
          f"malloc {'tuned' if args.keep_freed_memory else 'default'}")
    head = f"{'case':<30}{'base ms':>9}{'lora ms':>9}{'plan us':>8}{'lora/base':>10}"
    print(head + f"{'loop/lora':>10}{'gather/lora':>12}{'read/base':>10}{'noise':>6}  path")
    speedups = []
    for d in dims:
        for kind, n in (("decode", 64), ("decode", 8), ("prefill", 8)):
            n_reps = reps if d == 512 else max(5, reps // (4 if kind == "decode" else 8))
            t, path = run_case(d, kind, n, uniform, n_reps, False, gen)
            label = f"d={d} {kind} T={64 if kind == 'decode' else 2048} {n} adapters"
            gather = f"{t['gather'] / t['lora']:11.1f}x" if "gather" in t else f"{'-':>12}"
            read = f"{t['read'] / t['base']:10.1%}" if "read" in t else f"{'-':>10}"
            print(f"{label:<30}{t['base'] * 1e3:9.3f}{t['lora'] * 1e3:9.3f}{t['plan'] * 1e6:8.0f}"
                  f"{t['lora'] / t['base']:10.1%}{t['loop'] / t['lora']:9.1f}x{gather}"
                  f"{read}{t['noise']:6.2f}  {path}")
            speedups.append(f"d={d} {kind} {n} = {t['loop'] / t['lora']:.1f}")
    print("\nheterogeneous ranks (half the adapters rank 4, half 64): ours vs every slot "
          "at r_max=64;\nslots of the two ranks interleaved in the stack, or in two ranges")
    print(f"{'case':<30}{'base ms':>9}{'lora ms':>9}{'plan us':>8}{'lora/base':>10}"
          f"{'padded/base':>12}{'padded/lora':>12}{'noise':>6}  path")
    buckets = []
    for d in dims:
        for kind, n, layout in (("decode", 64, "interleaved"), ("decode", 64, "grouped"),
                                ("prefill", 8, "interleaved")):
            n_reps = reps if d == 512 else max(5, reps // (4 if kind == "decode" else 8))
            t, path = run_case(d, kind, n, mixed[layout], n_reps, True, gen)
            label = f"d={d} {kind} {n} ad {layout[:5]}"
            print(f"{label:<30}{t['base'] * 1e3:9.3f}{t['lora'] * 1e3:9.3f}{t['plan'] * 1e6:8.0f}"
                  f"{t['lora'] / t['base']:10.1%}{t['padded'] / t['base']:12.1%}"
                  f"{t['padded'] / t['lora']:11.2f}x{t['noise']:6.2f}  {path}")
            buckets.append(f"d={d} {kind} {layout[:5]} = {t['padded'] / t['lora']:.2f}")
    print(f"\nratio: PEFT's per-adapter loop / ours: {', '.join(speedups)}")
    print(f"ratio: every slot at r_max / ours (rank buckets): {', '.join(buckets)}")


if __name__ == "__main__":
    main()
