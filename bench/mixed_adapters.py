"""Throughput with many adapters in one batch vs none, and vs PEFT's own mixed-batch generate().

Default model, 32 requests x 32 prompt tokens x 32 new tokens, greedy, EOS ignored, one run:
  (a) no adapters            (b) one LoRA for every row
  (c) 32 distinct rank-16 LoRA adapters on q/k/v/o
  (d) 32 distinct adapters of mixed kinds (LoRA, IA3, bottleneck, prefix, prompt)
  (e) PEFT `generate(adapter_names=...)` with the adapters of (c), same weights
  (f) 32 distinct rank-16 DoRA adapters on q/k/v/o (LoRA of (c)'s shape plus the column scale)
Prints (c)/(a), (d)/(a), (c)/(e), (f)/(c) as a cost (targets: (c)/(a) >= 0.85, (c)/(e) >= 2.0,
DoRA cost <= 1.1x LoRA), and (c) again with 128 requests over 128 adapters.

    .venv/bin/python bench/mixed_adapters.py [--repeats 3] [--skip-128]
"""
from __future__ import annotations
from lorafleet.archive import archive_dir

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.adapters.refs import parse_tenant_ref
from server.adapters import formats  # noqa: E402
from server.adapters.formats import BaseModelShape, BottleneckTarget  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import build_adapters, keep_freed_memory  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402

TENANT = "bench"


def make_peft(base_dir: Path, out: Path, kind: str, seed: int):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM
    cfgs = {"lora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                       task_type="CAUSAL_LM"),
            "dora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                       task_type="CAUSAL_LM", use_dora=True),
            "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
            "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
            "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)}
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), cfgs[kind]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "prompt" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + torch.randn(p.shape, generator=g) * 0.1)
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


def run(engine: Engine, registry, prompts, adapters: list[str | None], n: int) -> float:
    done = threading.Semaphore(0)
    t0 = time.perf_counter()
    for p, a in zip(prompts, adapters):
        ref = registry.resolve(parse_tenant_ref(TENANT, a)) if a else None
        sink = (lambda ev: done.release() if isinstance(ev, FinishEvent) else None)
        engine.submit(Sequence("b", p, SamplingParams(max_new_tokens=n, ignore_eos=True), sink,
                               tenant=TENANT), ref)
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - t0


def run_peft(peft_model, prompts, names: list[str], n: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=None, adapter_names=names)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-128", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()                       # as the server does (server/main.py)
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="lorafleet-mixed-"))
    base_dir = resolve_model("random-512", Path(tempfile.gettempdir()) / "lorafleet-bench")
    loaded = load_model(base_dir, torch.device("cpu"), torch.float32)
    n_adapters = 32 if args.skip_128 else 128
    n_slots = max(n_adapters, 96)   # cases (c), (d), (f) stay resident: no slot writes while timing
    cfg = ServerConfig(data_dir=work / "store", adapter_slots=n_slots, max_adapter_rank=16)
    _store, serving = build_adapters(cfg, loaded)
    reg = serving.registry
    print(f"building {n_adapters} LoRA + 32 DoRA + 32 mixed adapters on {base_dir.name} ...", flush=True)
    lora_dirs = [make_peft(base_dir, work / f"lora{i}", "lora", i) for i in range(n_adapters)]
    for i, d in enumerate(lora_dirs):
        reg.put(TENANT, f"lora{i}", archive_dir(d))
    for i in range(32):
        reg.put(TENANT, f"dora{i}", archive_dir(make_peft(base_dir, work / f"dora{i}", "dora", 2000 + i)))
    kinds = ["lora", "ia3", "bottleneck", "prefix", "prompt"]
    for i in range(32):
        k = kinds[i % len(kinds)]
        d = make_bottleneck(base_dir, work / f"m{i}", i) if k == "bottleneck" else make_peft(base_dir, work / f"m{i}", k, 1000 + i)
        reg.put(TENANT, f"mix{i}", archive_dir(d))
    engine = Engine(loaded, max_batch_size=32, max_context_tokens=96, max_queued=1024, max_prefill_tokens=1024,
                    adapters=serving)
    engine.start()
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                           str(lora_dirs[0]), adapter_name="lora0").eval()
    for i in range(1, 32):
        peft_model.load_adapter(str(lora_dirs[i]), adapter_name=f"lora{i}")
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 259, (31,), generator=g).tolist() for _ in range(32)]
    cases = {
        "a": [None] * 32,
        "b": ["lora0"] * 32,
        "c": [f"lora{i}" for i in range(32)],
        "d": [f"mix{i}" for i in range(32)],
        "f": [f"dora{i}" for i in range(32)],
    }
    for c in cases.values():                                  # warm-up, and every slot loaded
        run(engine, reg, prompts, c, 2)
    run_peft(peft_model, prompts[:4], [f"lora{i}" for i in range(4)], 2)
    times: dict[str, list[float]] = {k: [] for k in [*cases, "e"]}
    for _ in range(args.repeats):                             # interleaved
        for k, c in cases.items():
            time.sleep(0.5)   # PEFT runs on this thread, the engine on its own: let the idle OpenMP pool sleep
            times[k].append(run(engine, reg, prompts, c, 32))
        time.sleep(0.5)
        times["e"].append(run_peft(peft_model, prompts, cases["c"], 32))
    tput = {k: 32 * 32 / statistics.median(v) for k, v in times.items()}
    print(f"model {base_dir.name}: 32 requests x 32 prompt x 32 new tokens, greedy, {args.threads} threads")
    names = {"a": "no adapters", "b": "1 LoRA, all rows", "c": "32 LoRA r16 q/k/v/o", "d": "32 mixed kinds",
             "e": "PEFT generate(adapter_names), 32 LoRA", "f": "32 DoRA r16 q/k/v/o"}
    for k, v in tput.items():
        print(f"  ({k}) {names[k]:<40} {v:8.1f} tokens/s")
    print(f"(c)/(a) = {tput['c'] / tput['a']:.2f}   (target >= 0.85)")
    print(f"(d)/(a) = {tput['d'] / tput['a']:.2f}")
    print(f"(c)/(e) = {tput['c'] / tput['e']:.2f}   (target >= 2.0)")
    print(f"DoRA cost (c)/(f) = {tput['c'] / tput['f']:.2f}x LoRA   (target <= 1.1)")
    if not args.skip_128:
        p128 = [[1] + torch.randint(3, 259, (31,), generator=g).tolist() for _ in range(128)]
        run(engine, reg, p128, [f"lora{i}" for i in range(128)], 2)
        t_a = statistics.median(run(engine, reg, p128, [None] * 128, 32) for _ in range(args.repeats))
        t_c = statistics.median(run(engine, reg, p128, [f"lora{i}" for i in range(128)], 32)
                                for _ in range(args.repeats))
        print(f"128 requests over 128 adapters (batch 32): (c)/(a) = {t_a / t_c:.2f}")
    engine.stop()


if __name__ == "__main__":
    main()
