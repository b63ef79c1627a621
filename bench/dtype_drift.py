"""How far bf16 and int8 serving drift from fp32, and what they buy: one run, every side interleaved.

Sides (the same weights): fp32 (the exact default: the parity tests hold it to transformers), bf16
(`--dtype bfloat16`: oneDNN bf16 linears, bf16 activations and KV cache, norms/softmax/sampler in
fp32, as transformers runs bf16), bf16-weights (`--quantize bf16`: only the base linears' weights and
matmuls in bf16, everything else fp32), int8 (`--quantize int8`) and w8-only (accuracy only, not a
server option: int8-rounded weights in fp32 matmuls, the drift weight-only int8 cannot go below). For
each side against fp32:

  drift     teacher-forced on fp32's own greedy text (the demo's held-out questions through the chat
            template + fp32's 32-token answer; random-token prompts for the tiny model, which has
            no chat template): per-position relative logit error ||l - l_fp32|| / ||l_fp32||, mean
            and max; the old figure (one relative L2 over all positions, `engine_vs_hf.py`'s); the
            share of positions whose top token is fp32's
  greedy    the engine generates --new-tokens greedily (EOS ignored) for every prompt in one batch,
            as the server does: share of generated tokens identical to fp32's (position by position),
            rows identical end to end, mean tokens before the first difference
  speed     one forward step + sampling: decode at batch 1 and 32 (context --prompt-tokens), prefill
            of 1 x 128 and 32 x 32 tokens; median ms of --repeats rounds, each round every side back
            to back; ratio = the median over rounds of fp32 ms / side ms
  demo      (--demo DIR, the work dir of `trainer/examples/demo.py --work DIR`, adapters trained and
            uploaded there) the demo's mixed batch and scores, served at each side's dtype

    PYTHONPATH=.:proto .venv/bin/python bench/dtype_drift.py [--model SPEC] [--repeats 5] [--demo DIR] [--smoke]

--smoke: the tiny model, 4 prompts x 4 new tokens, batches 1 and 4, one repeat (seconds; `make test` runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import set_thread_env  # noqa: E402
set_thread_env()          # OpenMP defaults, before torch loads libgomp (server/config.py)

import torch  # noqa: E402

from server.engine.batch import Segment, make_forward_batch  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.sampling import RowState, SamplingParams, sample  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import LoadedModel, load_model  # noqa: E402
from server.model.linear import BaseLinear  # noqa: E402
from server.model.llama import SMALL_ROWS  # noqa: E402
from server.model.quantize import quantize_model  # noqa: E402
from server.model.shape import TARGET_WEIGHT  # noqa: E402

CACHE = Path.home() / ".cache/lorafleet/models"
CPU = torch.device("cpu")
SIDES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "bf16-weights": (torch.float32, "bf16"),
         "int8": (torch.float32, "int8"), "w8-only": (torch.float32, "none")}   # side: (--dtype, --quantize)
ACCURACY_ONLY = {"w8-only"}     # simulated (int8-rounded weights in fp32 matmuls): not timed


def round_weights_to_int8(model) -> None:
    """Weight-only per-output-channel int8, simulated: every base linear and the LM head get their
    int8-rounded weights back in fp32 (activations untouched): the accuracy that int8 weights alone
    allow, whatever kernel would run them."""
    for lw in model.layers:
        for name in TARGET_WEIGHT.values():
            lin = getattr(lw, name)
            setattr(lw, name, BaseLinear(lin.quantized(None).dense(), lin.bias))
    model.lm_head = BaseLinear(model.lm_head.quantized(None).dense(), small_rows=SMALL_ROWS)


def load_side(model_dir: Path, side: str) -> LoadedModel:
    dtype, quantize = SIDES[side]
    loaded = load_model(model_dir, CPU, dtype)
    quantize_model(loaded.model, quantize)
    if side == "w8-only":
        round_weights_to_int8(loaded.model)
    return loaded


def prompts_for(loaded: LoadedModel, n: int, random_tokens: int, seed: int = 0) -> list[list[int]]:
    """The demo's held-out questions as chat prompts (repeated to n), or seeded random tokens
    without a chat template."""
    if loaded.chat is not None:
        from trainer.examples.demo_tasks import split
        qs = [f.question for f in split()[1]]
        return [loaded.chat.encode([("user", qs[i % len(qs)])], loaded.tokenizer) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, min(loaded.model.shape.vocab_size, 259), (random_tokens - 1,), generator=g).tolist()
            for _ in range(n)]


def generate(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one engine batch, EOS ignored."""
    longest = max(map(len, prompts))
    engine = Engine(loaded, max_batch_size=len(prompts), max_context_tokens=longest + new_tokens + 8,
                    max_queued=2 * len(prompts), max_prefill_tokens=len(prompts) * longest)
    engine.start()
    done = threading.Semaphore(0)
    outs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def sink_for(i: int):
        def sink(ev):
            outs[i].extend(ev.token_ids)
            if isinstance(ev, FinishEvent):
                done.release()
        return sink

    try:
        for i, p in enumerate(prompts):
            engine.submit(Sequence(str(i), p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), sink_for(i)))
        for _ in prompts:
            done.acquire()
    finally:
        engine.stop()
    return [outs[i] for i in range(len(prompts))]


def teacher_forced(model, seqs: list[list[int]], chunk: int = 4) -> list[torch.Tensor]:
    """fp32 logits [length, vocab] at every position of every sequence, `chunk` sequences a step."""
    out = []
    for c in range(0, len(seqs), chunk):
        part = seqs[c:c + chunk]
        kv, tables = KVCache.for_sequences(model.shape, [len(s) for s in part], model.device, model.dtype)
        batch = make_forward_batch([Segment(t, s, 0, False) for t, s in zip(tables, part)], model.device,
                                   kv.block_size)
        batch = dataclasses.replace(batch, logit_rows=torch.arange(batch.input_ids.numel()))
        out.extend(model.forward(batch, kv.layers).float().split([len(s) for s in part]))
    return out


def drift(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    """Per-position relative logit error (mean, max), one relative L2 over all, top-token agreement."""
    per = torch.cat([(g - r).norm(dim=-1) / r.norm(dim=-1) for g, r in zip(got, ref)])     # [positions]
    sq_err = sum(((g - r) ** 2).sum().item() for g, r in zip(got, ref))
    sq_ref = sum((r ** 2).sum().item() for r in ref)
    same = torch.cat([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)])
    return {"mean": per.mean().item(), "max": per.max().item(), "l2": (sq_err / sq_ref) ** 0.5,
            "argmax": same.double().mean().item()}


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y))
    total = sum(len(y) for y in ref)
    first = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(got, ref)]
    return {"tokens": same / total, "rows": sum(x == y for x, y in zip(got, ref)) / len(ref),
            "first_diff": statistics.mean(first), "total": total}


def step_ms(model, kv: KVCache, segs: list[Segment]) -> float:
    rows = [RowState(SamplingParams(max_new_tokens=1), s.token_ids, None) for s in segs]
    t0 = time.perf_counter()
    logits = model.forward(make_forward_batch(segs, model.device, kv.block_size), kv.layers)
    sample(logits, rows)
    return (time.perf_counter() - t0) * 1e3


def speed(models: dict, shapes: dict[str, tuple[int, int, int]], repeats: int) -> dict[str, dict[str, tuple]]:
    """{step: {side: (median ms, median over rounds of fp32 ms / side ms)}}; shapes {step: (batch,
    tokens per row, context before them)}. Each round runs every side back to back on the same
    tokens, so a round's ratio sees the same machine load on both sides."""
    a = next(iter(models.values())).shape
    B = max(b for b, _, _ in shapes.values())
    L = max(t + c for _, t, c in shapes.values()) + 1
    made = {side: KVCache.for_sequences(a, [L] * B, m.device, m.dtype) for side, m in models.items()}
    kvs = {side: kv for side, (kv, _) in made.items()}
    tables = next(iter(made.values()))[1]             # the same block tables on every side
    g = torch.Generator().manual_seed(1)
    ms: dict[str, dict[str, list[float]]] = {step: {side: [] for side in models} for step in shapes}
    for rep in range(repeats + 1):                         # the first round warms up
        for step, (b, t, ctx) in shapes.items():
            segs = [Segment(tables[i], torch.randint(3, min(a.vocab_size, 259), (t,), generator=g).tolist(), ctx, True)
                    for i in range(b)]
            for side, m in models.items():
                took = step_ms(m, kvs[side], segs)
                if rep:
                    ms[step][side].append(took)
    return {step: {side: (statistics.median(v), statistics.median(f / x for f, x in zip(d["fp32"], v)))
                   for side, v in d.items()} for step, d in ms.items()}


def demo_scores(work: Path, model_dir: Path, side: str) -> dict:
    """The demo's mixed batch on its held-out questions, served at this side's dtype/quantize."""
    from trainer.examples import demo
    files = demo.write(work / "data")
    facts = demo.held_out(files)
    keys = work / "keys.json"
    keys.unlink(missing_ok=True)
    tenants = demo.make_tenants(keys, 0)
    dtype, quantize = SIDES[side]
    with demo.start_server(model_dir, work, keys, batch=len(facts) * (len(tenants) + 1),
                           dtype=str(dtype).replace("torch.", ""), quantize=quantize) as running:
        columns = ["base", *[t.adapter for t in tenants]]
        got = demo.mixed_batch(f"127.0.0.1:{running.port}", tenants, [q for q, _ in facts])
    return {"scores": demo.score(got, columns, facts), "answers": got}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=24, help="prompts (the demo has 24 held-out questions)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="decode steps' context; random prompts' length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--demo", type=Path, help="demo work dir with trained adapters: also compare the demo's scores")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts x 4 new tokens, one repeat")
    args = ap.parse_args()
    shapes = {"decode b1": (1, 1, args.prompt_tokens), "decode b32": (32, 1, args.prompt_tokens),
              "prefill 1x128": (1, 128, 0), "prefill 32x32": (32, 32, 0)}
    if args.smoke:
        args.model, args.prompts, args.new_tokens, args.prompt_tokens, args.repeats = "tiny", 4, 4, 8, 1
        shapes = {"decode b1": (1, 1, 8), "decode b4": (4, 1, 8), "prefill 1x16": (1, 16, 0)}
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    model_dir = resolve_model(args.model, CACHE)
    sides = args.sides.split(",")
    assert sides[0] == "fp32", "fp32 is the reference side and comes first"
    loaded = {side: load_side(model_dir, side) for side in sides}
    prompts = prompts_for(loaded["fp32"], args.prompts, args.prompt_tokens)
    gen = {side: generate(lm, prompts, args.new_tokens) for side, lm in loaded.items()}
    seqs = [p + g for p, g in zip(prompts, gen["fp32"])]
    with torch.inference_mode():
        ref = teacher_forced(loaded["fp32"].model, seqs)
        drifts = {side: drift(teacher_forced(lm.model, seqs), ref) for side, lm in loaded.items() if side != "fp32"}
        agree = {side: agreement(gen[side], gen["fp32"]) for side in sides[1:]}
        times = speed({side: lm.model for side, lm in loaded.items() if side not in ACCURACY_ONLY}, shapes,
                      args.repeats)
    a = loaded["fp32"].model.shape
    print(f"model {model_dir.name} (hidden {a.hidden_size}, {a.num_layers} layers, vocab {a.vocab_size}); "
          f"{len(prompts)} prompts ({'chat' if loaded['fp32'].chat else 'random tokens'}) x {args.new_tokens} greedy "
          f"tokens ({sum(map(len, seqs))} teacher-forced positions); {args.threads} threads; step times: median ms "
          f"of {args.repeats} interleaved rounds (x fp32: median of the rounds' ratios); load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| side | logit err mean | max | L2 (old figure) | top token = fp32 | greedy tokens = fp32 | rows = fp32 "
          "| tokens to 1st diff | " + " | ".join(f"{s} ms (x fp32)" for s in shapes) + " |")
    print("| --- " * (8 + len(shapes)) + "|")
    for side in sides:
        d = drifts.get(side, {"mean": 0, "max": 0, "l2": 0, "argmax": 1})
        g = agree.get(side, {"tokens": 1, "rows": 1, "first_diff": args.new_tokens})
        cells = " | ".join(f"{times[s][side][0]:.1f} ({times[s][side][1]:.2f}x)" if side in times[s] else "-"
                           for s in shapes)
        print(f"| {side} | {100 * d['mean']:.2f}% | {100 * d['max']:.1f}% | {100 * d['l2']:.2f}% | {100 * d['argmax']:.1f}% "
              f"| {100 * g['tokens']:.1f}% | {100 * g['rows']:.0f}% | {g['first_diff']:.1f} | {cells} |")
    for side in sides[1:]:
        d, g = drifts[side], agree[side]
        print(f"ratio: {side} mean logit err = {d['mean']:.4f}; {side} greedy tokens = fp32 share = {g['tokens']:.3f}; "
              + "; ".join(f"{side} {s} speed vs fp32 = {times[s][side][1]:.2f}" for s in shapes if side in times[s]),
              flush=True)
    if args.demo:
        sides = [side for side in sides if side not in ACCURACY_ONLY]          # served sides only
        demo = {side: demo_scores(args.demo, model_dir, side) for side in sides}
        cols = list(next(iter(demo["fp32"]["scores"].values())))
        print(f"\ndemo scores on the held-out questions (greedy), served at each side ({args.demo})")
        print("| score | " + " | ".join(f"{c} {side}" for c in cols for side in sides) + " |")
        print("| --- " * (1 + len(cols) * len(sides)) + "|")
        for name in demo["fp32"]["scores"]:
            print(f"| {name} | " + " | ".join(f"{100 * demo[side]['scores'][name][c]:.0f}%" for c in cols for side in sides)
                  + " |")
        for side in sides[1:]:
            same = sum(demo[side]["answers"][k] == v for k, v in demo["fp32"]["answers"].items())
            print(f"ratio: {side} demo answers = fp32 share = {same / len(demo['fp32']['answers']):.3f}")


if __name__ == "__main__":
    main()
