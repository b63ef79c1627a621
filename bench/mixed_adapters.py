"""Throughput with many adapters in one batch vs none, and vs PEFT's own mixed-batch generate().

SmolLM2-135M's shape (--model), 32 requests x 32 prompt tokens x 32 new tokens, greedy, EOS ignored:
  (a) no adapters            (b) one LoRA for every row
  (c) 32 distinct rank-16 LoRAs on all seven targets (q/k/v/o/gate/up/down)
  (d) zipf(1.0) traffic over 128 rank-8 LoRAs on q/k/v/o (seeded draw of 32 rows)
  (e) PEFT `generate(adapter_names=...)` with the adapters of (c), same weights
  (f) 32 distinct adapters of mixed kinds (LoRA, IA3, bottleneck, prefix, prompt)
  (g) 32 distinct rank-16 DoRA adapters on all seven targets (c's LoRAs plus DoRA's column scale)
Interleaved, median of --repeats. Prints (c)/(a), (d)/(a), (c)/(e) and (c)'s decode step against
its bytes-moved floor: (base weights + the step's distinct adapter weights + KV read) / the memory
bandwidth this machine reaches in the same run (targets: (d)/(a) >= 0.85, (c) <= 1.3x floor,
(c)/(e) >= 3), and DoRA's cost (c)/(g) (target <= 1.1).

    PYTHONPATH=.:proto .venv/bin/python bench/mixed_adapters.py [--model SPEC] [--repeats 3] [--quick] [--smoke]

--quick: 16 new tokens and 32 zipf adapters instead of 128 (SmolLM2 on 2 cores: several minutes; the full
run is longer). --smoke: the tiny model, 8 requests (so 8 adapters per case, 8 zipf adapters), 4 new
tokens, one repeat: every case runs in seconds (`make test` runs it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import set_thread_env  # noqa: E402
set_thread_env()          # OpenMP defaults, before torch loads libgomp (server/config.py)

import torch  # noqa: E402

from lorafleet.archive import archive_dir  # noqa: E402
from server.adapters import formats  # noqa: E402
from server.adapters.weights import BottleneckTarget  # noqa: E402
from server.model.shape import LINEAR_MODULES, BaseModelShape  # noqa: E402
from server.adapters.refs import parse_tenant_ref  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server import threads  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import build_adapters, keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402

TENANT = "bench"


ALL = list(LINEAR_MODULES)
_PEFT: dict[str, object] = {}      # kind -> one PEFT model, re-randomised per adapter (building is slow)


def make_peft(base_dir: Path, out: Path, kind: str, seed: int):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM
    cfgs = {"lora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL, task_type="CAUSAL_LM"),
            "dora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL, task_type="CAUSAL_LM", use_dora=True),
            "lora8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL[:4], task_type="CAUSAL_LM"),
            "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
            "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
            "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)}
    if kind not in _PEFT:
        torch.manual_seed(seed)
        _PEFT[kind] = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), cfgs[kind]())
    model = _PEFT[kind]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name or "prompt" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude" in name:
                p.mul_(1 + torch.randn(p.shape, generator=g) * 0.05)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(out))
    return out


def make_bottleneck(base_dir: Path, out: Path, seed: int) -> Path:
    shape = BaseModelShape.from_hf_config(json.loads((base_dir / "config.json").read_text()))
    g = torch.Generator().manual_seed(seed)
    d = shape.hidden_size
    targets = {(l, p): BottleneckTarget(torch.randn(16, d, generator=g) * 0.05, None,
                                        torch.randn(d, 16, generator=g) * 0.05, None, "relu")
               for l in range(shape.num_layers) for p in ("attn", "mlp")}
    formats.write_bottleneck(out, targets, shape)
    return out


def run(engine: Engine, registry, prompts, adapters: list[str | None], n: int) -> tuple[float, float]:
    """(wall seconds, seconds per decode step after the last first token)."""
    done = threading.Semaphore(0)
    seqs = []
    threads.release_team()     # as the server does: the engine thread's team alone (server/threads.py)
    t0 = time.perf_counter()
    for p, a in zip(prompts, adapters):
        ref = registry.resolve(parse_tenant_ref(TENANT, a)) if a else None
        sink = (lambda ev: done.release() if isinstance(ev, FinishEvent) else None)
        seqs.append(Sequence("b", p, SamplingParams(max_new_tokens=n, ignore_eos=True), sink, tenant=TENANT))
        engine.submit(seqs[-1], ref)
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - t0
    end = time.monotonic()
    return wall, (end - max(s.first_token_at for s in seqs)) / max(n - 1, 1)


def bytes_floor(model, adapters: list[str | None], ranks: dict[str, tuple[int, list[str]]], ctx: int) -> dict:
    """Bytes one decode step must read: base linears + LM head, each distinct adapter's A and B on
    its targets, every row's K and V up to ctx."""
    a = model.shape
    base = sum(lin.nbytes() for lw in model.layers for lin in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down))
    base += model.lm_head.nbytes()
    ad = 0
    for name in {x for x in adapters if x}:
        r, targets = ranks[name]
        ad += a.num_layers * sum(r * sum(a.linear_dims(t)) for t in targets) * 4
    kv = len(adapters) * a.num_layers * 2 * ctx * a.kv_size * 4
    return {"base": base, "adapters": ad, "kv": kv, "total": base + ad + kv}


def bandwidth() -> float:
    """Bytes/s this machine reads now: the best of a few sums over 256 MiB."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_peft(peft_model, prompts, names: list[str], n: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=None, adapter_names=names)
    return time.perf_counter() - t0


def zipf_draw(n_rows: int, n_adapters: int, seed: int) -> list[int]:
    """Adapter index per row, P(k) ~ 1/(k+1) (zipf, exponent 1.0), seeded."""
    w = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64)
    return torch.multinomial(w, n_rows, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32, help="rows per batch, and distinct adapters per case")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 32 zipf adapters instead of 128")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 8 requests, 8 zipf adapters, 4 new tokens, one repeat: checks it runs")
    args = ap.parse_args()
    n_zipf = 32 if args.quick else 128
    if args.quick:
        args.new_tokens = 16
    if args.smoke:
        args.model, args.requests, n_zipf, args.new_tokens, args.repeats = "tiny", 8, 8, 4, 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()                       # as the server does (server/main.py)
    with tempfile.TemporaryDirectory(prefix="lorafleet-mixed-") as work:
        measure(args, n_zipf, Path(work))


def measure(args: argparse.Namespace, n_zipf: int, work: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    R = args.requests
    base_dir = resolve_model(args.model, Path.home() / ".cache/lorafleet/models")
    loaded = load_model(base_dir, torch.device("cpu"), torch.float32)
    zipf_rows = zipf_draw(R, n_zipf, 0)
    zipf_used = sorted(set(zipf_rows))
    cfg = ServerConfig(data_dir=work / "store", adapter_slots=3 * R + len(zipf_used), max_adapter_rank=16,
                       tenant_max_adapter_bytes=1 << 40, max_adapter_bytes=1 << 30)
    _store, serving = build_adapters(cfg, loaded)
    reg = serving.registry
    print(f"building {R} LoRA r16 (all targets) + {len(zipf_used)} of {n_zipf} LoRA r8 (q/k/v/o) + {R} DoRA r16 "
          f"+ {R} mixed adapters on {base_dir.name} ...", flush=True)
    ranks: dict[str, tuple[int, list[str]]] = {}
    lora_dirs = [make_peft(base_dir, work / f"lora{i}", "lora", i) for i in range(R)]
    for i, d in enumerate(lora_dirs):
        reg.put(TENANT, f"lora{i}", archive_dir(d))
        ranks[f"lora{i}"] = (16, ALL)
    for i in zipf_used:                                       # only the drawn ones are ever resident
        reg.put(TENANT, f"z{i}", archive_dir(make_peft(base_dir, work / f"z{i}", "lora8", 500 + i)))
        ranks[f"z{i}"] = (8, ALL[:4])
    for i in range(R):
        reg.put(TENANT, f"dora{i}", archive_dir(make_peft(base_dir, work / f"dora{i}", "dora", 2000 + i)))
    kinds = ["lora", "ia3", "bottleneck", "prefix", "prompt"]
    for i in range(R):
        k = kinds[i % len(kinds)]
        d = make_bottleneck(base_dir, work / f"m{i}", i) if k == "bottleneck" else make_peft(base_dir, work / f"m{i}", k, 1000 + i)
        reg.put(TENANT, f"mix{i}", archive_dir(d))
    _PEFT.clear()
    ctx = 32 + args.new_tokens
    # prefix cache off: every case re-sends the same prompts (bench/prefix_cache.py measures the cache)
    engine = Engine(loaded, max_batch_size=R, max_context_tokens=ctx + 16, max_queued=1024, prefix_cache=False,
                    max_prefill_tokens=R * 32, adapters=serving)
    engine.start()
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                           str(lora_dirs[0]), adapter_name="lora0").eval()
    for i in range(1, R):
        peft_model.load_adapter(str(lora_dirs[i]), adapter_name=f"lora{i}")
    g = torch.Generator().manual_seed(0)
    hi = min(loaded.model.shape.vocab_size, 20000)
    prompts = [[1] + torch.randint(3, hi, (31,), generator=g).tolist() for _ in range(R)]
    cases = {
        "a": [None] * R,
        "b": ["lora0"] * R,
        "c": [f"lora{i}" for i in range(R)],
        "d": [f"z{i}" for i in zipf_rows],
        "f": [f"mix{i}" for i in range(R)],
        "g": [f"dora{i}" for i in range(R)],
    }
    for c in cases.values():                                  # warm-up, and every slot loaded
        run(engine, reg, prompts, c, 2)
    run_peft(peft_model, prompts[:4], cases["c"][:4], 2)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in [*cases, "e"]}
    bws = []
    for _ in range(args.repeats):                             # interleaved
        for k, c in cases.items():
            time.sleep(0.3)   # PEFT runs on this thread, the engine on its own: let the idle OpenMP pool sleep
            times[k].append(run(engine, reg, prompts, c, args.new_tokens))
        time.sleep(0.3)
        times["e"].append((run_peft(peft_model, prompts, cases["c"], args.new_tokens), float("nan")))
        bws.append(bandwidth())
    engine.stop()
    tput = {k: R * args.new_tokens / statistics.median(w for w, _ in v) for k, v in times.items()}
    step = {k: statistics.median(s for _, s in v) for k, v in times.items() if k != "e"}
    bw = statistics.median(bws)
    print(f"model {base_dir.name}: {R} requests x 32 prompt x {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    names = {"a": "no adapters", "b": "1 LoRA r16, all rows", "c": f"{R} LoRA r16, all 7 targets",
             "d": f"zipf(1.0) over {n_zipf} LoRA r8 q/k/v/o ({len(zipf_used)} distinct)",
             "f": f"{R} mixed kinds (LoRA/IA3/bottleneck/prefix/prompt)",
             "e": "PEFT generate(adapter_names), adapters of (c)", "g": f"{R} DoRA r16, all 7 targets"}
    print("| case | tokens/s | vs (a) | decode step ms |")
    print("| --- | ---: | ---: | ---: |")
    for k in ("a", "b", "c", "d", "f", "g", "e"):
        ms = f"{step[k] * 1e3:.1f}" if k in step else "-"
        print(f"| ({k}) {names[k]} | {tput[k]:.1f} | {tput[k] / tput['a']:.2f} | {ms} |")
    fl = bytes_floor(loaded.model, cases["c"], ranks, ctx)
    floor_s = fl["total"] / bw
    print(f"ratio: (c)/(a) = {tput['c'] / tput['a']:.2f}   (d)/(a) = {tput['d'] / tput['a']:.2f} (target >= 0.85)   "
          f"(c)/(e) = {tput['c'] / tput['e']:.2f} (target >= 3)")
    print(f"(c) bytes per decode step: base {fl['base'] / 1e6:.0f} MB + adapters {fl['adapters'] / 1e6:.0f} MB + "
          f"KV {fl['kv'] / 1e6:.0f} MB = {fl['total'] / 1e6:.0f} MB; at {bw / 1e9:.1f} GB/s (measured) the floor is "
          f"{floor_s * 1e3:.1f} ms; (c) takes {step['c'] * 1e3:.1f} ms = {step['c'] / floor_s:.2f}x floor (target <= 1.3)")
    print(f"ratio: DoRA cost (c)/(g) = {tput['c'] / tput['g']:.2f}x LoRA of the same rank (target <= 1.1)")


if __name__ == "__main__":
    main()
