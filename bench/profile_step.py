"""Where one engine step's time goes: a prefill step and a decode step at batch 1, 8 and 32.

Runs the model's own forward (as the engine does: batch build -> forward -> LM head -> sample)
under torch.profiler and splits each step's wall time into

  matmul        the base linears and the LM head (aten mm/addmm, oneDNN/fbgemm linears)
  attention     KV writes and reads, scores, softmax, SDPA (ops on 4-D tensors, index_put_)
  elementwise   norms, RoPE, SiLU*up, residual adds, embedding lookup, slicing
  adapters      with --loras N: the adapter hooks' ops (plans built, batched LoRA kernels)
  sampling      `sampling.sample` (argmax / top-k / top-p, host copy of the tokens)
  python        batch building + the forward's own Python between ops (wall - ops)

Prints one table (ms per step and share of the step) and the matmul share of each step as a ratio
line. Median of --repeats profiled runs.

    PYTHONPATH=.:proto .venv/bin/python bench/profile_step.py [--model SPEC] [--dtype bfloat16] [--quantize bf16|int8]
        [--loras N] [--quick] [--smoke]

--loras N: N random rank-16 LoRAs on all seven linears in adapter slots, row i of a batch on LoRA
i % N (decode rows each on their own adapter at batch <= N: the 33-way mix's decode step).

--quick: batches 1 and 32, one repeat. --smoke: the tiny model, batches 1 and 8, 4 LoRAs, one repeat (seconds;
`make test` runs it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import set_thread_env  # noqa: E402
set_thread_env()          # OpenMP defaults, before torch loads libgomp (server/config.py)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from server.adapters.weights import AdapterKind, AdapterWeights, LoraTarget  # noqa: E402
from server.engine.adapter_slots import AdapterSlots  # noqa: E402
from server.engine.batch import Segment, make_forward_batch  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.sampling import RowState, SamplingParams, sample  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.model.quantize import quantize_model  # noqa: E402
from server.model.shape import LINEAR_MODULES  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "quantized::linear_dynamic",
          "onednn::qlinear_pointwise", "aten::linear"}
ATTENTION = {"aten::scaled_dot_product_attention", "aten::index_put_", "aten::_softmax", "aten::softmax",
             "aten::bmm"}
CATEGORIES = ("matmul", "attention", "elementwise", "adapters", "sampling", "python")
LORA_RANK = 16


def classify(ev) -> str:
    if ev.name in MATMUL:
        return "matmul"
    if ev.name == "aten::matmul":          # 2-D operands: a linear; more: attention scores / values
        dims = [len(s) for s in ev.input_shapes if s]
        return "matmul" if dims and max(dims) <= 2 else "attention"
    if ev.name in ATTENTION or any(len(s) == 4 for s in ev.input_shapes if s):
        return "attention"
    return "elementwise"


class _Marked:
    """The step's adapter hooks, each call under the profiler label "#adapters"."""

    def __init__(self, hooks):
        self.hooks = hooks

    def __getattr__(self, name):
        fn = getattr(self.hooks, name)

        def marked(*args):
            with record_function("#adapters"):
                return fn(*args)
        return marked


def lora_slots(model, n: int, seed: int = 0) -> AdapterSlots:
    """n random rank-16 LoRAs (alpha 32) on all seven linears, written into slots 0..n-1."""
    a, g = model.shape, torch.Generator().manual_seed(seed)
    slots = AdapterSlots(a, n, LORA_RANK, model.device, model.dtype, base=model.layers)
    for s in range(n):
        lora = {}
        for layer in range(a.num_layers):
            for m in LINEAR_MODULES:
                d_in, d_out = a.linear_dims(m)
                lora[(layer, m)] = LoraTarget(torch.randn(LORA_RANK, d_in, generator=g) * 0.02,
                                              torch.randn(d_out, LORA_RANK, generator=g) * 0.02, 2.0)
        slots.write(s, AdapterWeights(AdapterKind.LORA, lora, {}, {}, None, None, None, LORA_RANK, 0, {}))
    return slots


def one_step(model, kv, segs, rows, slots: AdapterSlots | None = None) -> dict[str, float]:
    """Profile one step; ms per category. slots: row i of segment k on slot k % n."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        with record_function("#batch"):
            batch = make_forward_batch(segs, model.device, kv.block_size)
            hooks = None
            if slots is not None:
                row_slots = [k % slots.num_slots for k, s in enumerate(segs) for _ in s.token_ids]
                hooks = _Marked(slots.step(row_slots, []))
        with record_function("#forward"):
            hidden = model.forward(batch, kv.layers, hooks, return_hidden=True)
            logits = model.logits(hidden)
        with record_function("#sample"):
            sample(logits, rows)
        wall = (time.perf_counter() - t0) * 1e3
    out = dict.fromkeys(CATEGORIES, 0.0)
    events = prof.events()
    marks = {e.name: e for e in events if e.name.startswith("#")}
    out["sampling"] = marks["#sample"].cpu_time_total / 1e3
    fwd = marks["#forward"]
    ops = 0.0
    for e in events:
        if e.cpu_parent is not None and e.cpu_parent.id == fwd.id:
            ms = e.cpu_time_total / 1e3
            out["adapters" if e.name == "#adapters" else classify(e)] += ms
            ops += ms
    out["python"] = wall - out["sampling"] - ops          # batch building + the glue between ops
    out["total"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--quantize", default="none", choices=("none", "bf16", "int8"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loras", type=int, default=0, help="LoRAs in adapter slots, row i on LoRA i %% N (0: none)")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 32, one repeat")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batches 1 and 8, one repeat: checks it runs")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.repeats = "1,32", 1
    if args.smoke:
        args.model, args.batches, args.repeats, args.loras = "tiny", "1,8", 1, args.loras or 4
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, Path.home() / ".cache/lorafleet/models")
    loaded = load_model(model_dir, torch.device("cpu"), getattr(torch, args.dtype))
    model = quantize_model(loaded.model, args.quantize)
    a = model.shape
    slots = lora_slots(model, args.loras) if args.loras else None
    batches = [int(b) for b in args.batches.split(",")]
    kv, tables = KVCache.for_sequences(a, [args.prompt_tokens + 8] * max(batches), model.device, model.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"model {model_dir.name} (hidden {a.hidden_size}, {a.num_layers} layers, vocab {a.vocab_size}), "
          f"dtype={args.dtype}, quantize={args.quantize}, {args.loras} LoRAs, prompt {args.prompt_tokens} tokens, {args.threads} threads, "
          f"median of {args.repeats}; ms per step (share)")
    print(f"{'step':<12}" + "".join(f"{c:>17}" for c in (*CATEGORIES, "total")))
    shares = []
    for B in batches:
        prompts = [torch.randint(3, 259, (args.prompt_tokens,), generator=g).tolist() for _ in range(B)]
        rows = [RowState(SamplingParams(max_new_tokens=1), p, None) for p in prompts]
        prefill = [Segment(tables[i], p, 0, True) for i, p in enumerate(prompts)]
        decode = [Segment(tables[i], [5], args.prompt_tokens, True) for i in range(B)]
        for name, segs in (("prefill", prefill), ("decode", decode)):
            one_step(model, kv, segs, rows, slots)                   # warm-up
            runs = [one_step(model, kv, segs, rows, slots) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            cells = "".join(f"{med[c]:9.1f} ({100 * med[c] / med['total']:3.0f}%)" for c in CATEGORIES)
            print(f"{name + ' b' + str(B):<12}{cells}{med['total']:11.1f}", flush=True)
            shares.append(f"{name} b{B} = {med['matmul'] / med['total']:.2f}")
    print(f"ratio: matmul time / step time: {', '.join(shares)}")


if __name__ == "__main__":
    main()
