"""Our engine vs transformers' generate() on the same weights and work, with a roofline column.

For each model (default: SmolLM2-135M-Instruct's shape, then the tiny test model):
  batch 32: 32 requests x 32-token prompts x 32 new tokens, greedy, EOS ignored; tokens/s of the
            engine (fp32, exact), the engine with --quantize int8, and HF generate(); ratios.
  roofline: achieved GFLOP/s of the engine's prefill (first-token wait) and decode (the rest) vs
            the peak this machine reaches on plain matmuls at 1024 rows of the same shapes; and
            the decode step's base matmuls alone (the model's own linears, 32 rows) vs that peak.
  batch 1:  time to first token and time per output token of the engine vs HF.
All sides run interleaved in one process (A, B, C, A, B, C ...); medians of --repeats.

    PYTHONPATH=.:proto .venv/bin/python bench/engine_vs_hf.py [--models smollm2,tiny] [--repeats 3] [--quick]

--quick: 16 new tokens (about a minute per model). --smoke: the tiny model only, 4 requests x 8 prompt x 4 new
tokens, one repeat: every phase runs in seconds (`make test` runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import set_thread_env  # noqa: E402
set_thread_env()          # OpenMP defaults, before torch loads libgomp (server/config.py)

import torch  # noqa: E402

from server import threads  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.model.linear import BaseLinear  # noqa: E402
from server.model.quantize import quantize_model  # noqa: E402
from server.model.shape import BaseModelShape  # noqa: E402

CACHE = Path.home() / ".cache/lorafleet/models"


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Wall time, time to the last first token (the prefill), tokens, batch-1 TTFT/TPOT."""
    done = threading.Semaphore(0)
    outs: dict[int, list[int]] = {}
    ends: dict[int, float] = {}
    seqs = []

    def sink_for(i: int):
        def sink(ev):
            outs.setdefault(i, []).extend(ev.token_ids)
            if isinstance(ev, FinishEvent):
                ends[i] = time.monotonic()
                done.release()
        return sink

    threads.release_team()     # as the server does: the engine thread's team alone (server/threads.py)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        seqs.append(Sequence(str(i), p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), sink_for(i)))
        engine.submit(seqs[-1])
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - t0
    first = max(s.first_token_at for s in seqs) - min(s.arrival for s in seqs)
    s0 = seqs[0]
    return {"wall": wall, "prefill": first, "tokens": [outs[i] for i in range(len(prompts))],
            "ttft": s0.first_token_at - s0.arrival, "tpot": (ends[0] - s0.first_token_at) / max(new_tokens - 1, 1)}


def run_hf(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    ids = torch.tensor(prompts)

    def gen(n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)  # both ignore EOS
        return time.perf_counter() - t0, out

    first, _ = gen(1)
    wall, out = gen(new_tokens)
    return {"wall": wall, "prefill": first, "tokens": out[:, ids.shape[1]:].tolist(), "ttft": first,
            "tpot": (wall - first) / max(new_tokens - 1, 1)}


def flops(shape, rows: int, ctx: int) -> float:
    """Forward FLOPs of `rows` tokens attending to ~ctx keys each, LM head on every row."""
    d = shape.hidden_size
    lin = d * (shape.q_size + 2 * shape.kv_size) + shape.q_size * d + 3 * d * shape.intermediate_size
    attn = 2 * shape.num_heads * shape.head_dim * ctx
    return 2.0 * rows * (shape.num_layers * (lin + attn) + d * shape.vocab_size)


def best_ms(fn, n: int = 5) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def matmul_roofline(model, shape: BaseModelShape, repeats: int) -> tuple[float, float]:
    """(peak GFLOP/s: the best of plain `x @ w` and oneDNN at 1024 rows of the model's linear
    shapes; decode GFLOP/s: the model's own base linears + LM head at 32 rows). Interleaved."""
    lw = model.layers[0]
    lins = [lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down]
    dense = [(lin.dense().T.contiguous(), BaseLinear(lin.dense(), mode="onednn")) for lin in lins]
    peak_rows, dec_rows = 1024, 32
    xs = [torch.randn(peak_rows, w.shape[0]) for w, _ in dense]
    xd = [torch.randn(dec_rows, lin.d_in) for lin in lins]
    hd = torch.randn(dec_rows, model.shape.hidden_size)
    f_peak = sum(2 * peak_rows * w.numel() for w, _ in dense)
    f_dec = sum(2 * dec_rows * lin.d_in * lin.d_out for lin in lins)
    f_head = 2 * dec_rows * model.lm_head.d_in * model.lm_head.d_out
    peaks, decs = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            plain = best_ms(lambda: [x @ w for x, (w, _) in zip(xs, dense)])
            onednn = best_ms(lambda: [p(x) for x, (_, p) in zip(xs, dense)])
            peaks.append(f_peak / min(plain, onednn) / 1e6)
            layer = best_ms(lambda: [lin(x) for x, lin in zip(xd, lins)])
            head = best_ms(lambda: model.lm_head(hd), 2)
            decs.append((f_dec * model.shape.num_layers + f_head) / (layer * model.shape.num_layers + head) / 1e6)
    return statistics.median(peaks), statistics.median(decs)


def int8_drift(fp32, int8, prompts: list[list[int]]) -> tuple[float, float]:
    """Teacher-forced drift of the int8 model from fp32 on the prompts: (relative L2 error of the
    logits at every prompt position, share of positions whose argmax is the same)."""
    from server.engine.batch import Segment, make_forward_batch
    from server.engine.kv_cache import KVCache
    outs = []
    for m in (fp32, int8):
        kv, tables = KVCache.for_sequences(m.shape, [len(p) for p in prompts], m.device, m.dtype)
        segs = [Segment(t, p, 0, False) for t, p in zip(tables, prompts)]
        batch = make_forward_batch(segs, m.device, kv.block_size)
        batch = dataclasses.replace(batch, logit_rows=torch.arange(batch.input_ids.numel()))
        outs.append(m.forward(batch, kv.layers))
    ref, q = outs
    return ((q - ref).norm() / ref.norm()).item(), (q.argmax(-1) == ref.argmax(-1)).double().mean().item()


def bench_model(spec: str, args) -> None:
    from transformers import LlamaForCausalLM
    model_dir = resolve_model(None if spec == "smollm2" else spec, CACHE)
    dev = torch.device("cpu")
    fp32 = load_model(model_dir, dev, torch.float32)
    int8 = load_model(model_dir, dev, torch.float32)
    quantize_model(int8.model, "int8")
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    a = fp32.model.shape
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, min(a.vocab_size, 259 if a.vocab_size < 1000 else 20000),
                                   (args.prompt_tokens - 1,), generator=g).tolist() for _ in range(args.requests)]
    ctx = args.prompt_tokens + args.new_tokens + 8

    def engine(loaded):
        # prefix cache off: every repeat re-sends the same prompts, which HF's generate() recomputes
        # (bench/prefix_cache.py measures the cache)
        e = Engine(loaded, max_batch_size=args.requests, max_context_tokens=ctx, max_queued=args.requests * 2,
                   max_prefill_tokens=args.requests * args.prompt_tokens, prefix_cache=False)
        e.start()
        return e

    sides = {"engine fp32": engine(fp32), "engine int8": engine(int8)}
    results: dict[str, list[dict]] = {k: [] for k in (*sides, "HF generate fp32")}
    b1: dict[str, list[dict]] = {"engine fp32": [], "HF generate fp32": []}
    for e in sides.values():                      # warm-up
        run_engine(e, prompts[:4], 4)
    run_hf(hf, prompts[:4], 4)
    for _ in range(args.repeats):                 # interleaved
        for k, e in sides.items():
            time.sleep(0.3)   # HF runs on this thread, the engine on its own: let the other OpenMP pool go idle
            results[k].append(run_engine(e, prompts, args.new_tokens))
        time.sleep(0.3)
        results["HF generate fp32"].append(run_hf(hf, prompts, args.new_tokens))
        time.sleep(0.3)
        b1["engine fp32"].append(run_engine(sides["engine fp32"], prompts[:1], args.new_tokens))
        time.sleep(0.3)
        b1["HF generate fp32"].append(run_hf(hf, prompts[:1], args.new_tokens))
    for e in sides.values():
        e.stop()
    peak, dec_mm = matmul_roofline(fp32.model, a, args.repeats)
    drift, same_argmax = int8_drift(fp32.model, int8.model, prompts[:8])

    total = args.requests * args.new_tokens
    f_pre = flops(a, args.requests * args.prompt_tokens, args.prompt_tokens // 2)
    f_dec = flops(a, args.requests * (args.new_tokens - 1), args.prompt_tokens + args.new_tokens // 2)
    hf_tok = results["HF generate fp32"]
    print(f"\nmodel {model_dir.name} (hidden {a.hidden_size}, {a.num_layers} layers, vocab {a.vocab_size}): {args.requests} "
          f"requests x {args.prompt_tokens} prompt x {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    print(f"matmul peak (1024 rows, same shapes): {peak:.1f} GFLOP/s;  decode-step base matmuls at "
          f"32 rows: {dec_mm:.1f} GFLOP/s = {100 * dec_mm / peak:.0f}% of peak (target >= 60%)")
    print(f"| side | tokens/s | vs HF | prefill GFLOP/s (% peak) | decode GFLOP/s (% peak) | greedy tokens = HF |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    hf_wall = statistics.median(r["wall"] for r in hf_tok)
    for k, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        pre = statistics.median(r["prefill"] for r in rs)
        dec = statistics.median(r["wall"] - r["prefill"] for r in rs)
        same = sum(x == y for x, y in zip(rs[-1]["tokens"], hf_tok[-1]["tokens"]))
        tok_same = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(rs[-1]["tokens"], hf_tok[-1]["tokens"]))
        print(f"| {k} | {total / wall:.1f} | {hf_wall / wall:.2f}x | {f_pre / pre / 1e9:.1f} ({100 * f_pre / pre / 1e9 / peak:.0f}%)"
              f" | {f_dec / dec / 1e9:.1f} ({100 * f_dec / dec / 1e9 / peak:.0f}%) | {same}/{args.requests} rows, "
              f"{100 * tok_same / total:.0f}% tokens |")
    print(f"int8 drift from fp32 (teacher-forced, {len(prompts[:8]) * args.prompt_tokens} positions): "
          f"logits relative error "
          f"{drift:.3f}, argmax identical at {100 * same_argmax:.0f}% of positions")
    ttft = {k: statistics.median(r["ttft"] for r in v) * 1e3 for k, v in b1.items()}
    tpot = {k: statistics.median(r["tpot"] for r in v) * 1e3 for k, v in b1.items()}
    print(f"batch 1: TTFT engine {ttft['engine fp32']:.1f} ms vs HF {ttft['HF generate fp32']:.1f} ms "
          f"({ttft['HF generate fp32'] / ttft['engine fp32']:.2f}x); TPOT engine {tpot['engine fp32']:.1f} ms vs HF "
          f"{tpot['HF generate fp32']:.1f} ms ({tpot['HF generate fp32'] / tpot['engine fp32']:.2f}x, target >= 1)")
    print(f"ratio: {model_dir.name} engine fp32 / HF = "
          f"{hf_wall / statistics.median(r['wall'] for r in results['engine fp32']):.2f} (target >= 1.5); "
          f"engine int8 / HF fp32 = {hf_wall / statistics.median(r['wall'] for r in results['engine int8']):.2f} "
          f"(target >= 3)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tiny", help="comma list: smollm2, tiny, random-512, a directory")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 3 repeats: about a minute per model")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 4 x 8 prompt x 4 new, one repeat: checks it runs")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens = 16
    if args.smoke:
        args.models, args.requests, args.prompt_tokens, args.new_tokens, args.repeats = "tiny", 4, 8, 4, 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()                       # as the server does (server/main.py)
    for spec in args.models.split(","):
        bench_model(spec, args)


if __name__ == "__main__":
    main()
