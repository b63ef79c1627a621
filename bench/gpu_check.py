"""One prepared GPU check (issue 17): kernels, parity and benches on CUDA, one report.

    make gpu-check                                  # on the GPU machine (its own python3)
    python3 bench/gpu_check.py --device cpu --quick # dry run of every section, anywhere
    python3 bench/gpu_check.py --smoke              # the dry run less kernel_tests (`make test` runs it)

Sections (each catches its own failure, so one failure never loses the report):

  kernel_tests   pytest on tests/unit/test_kernels*.py: on CUDA the property tests
                 parametrize on cuda and the Triton kernels are compiled, not interpreted
  parity_fp32,   our Llama forward vs transformers on the device (tiny model): prefill
  parity_bf16    logits (norm-relative error) and greedy tokens vs generate()
  kernel_bench   lora (shrink+expand), 64 distinct rank-16 adapters, d=4096, 64 tokens,
                 bf16: achieved bandwidth as a share of a plain device copy measured in
                 the same run, for torch_ops and triton_ops (target: triton >= 60%)
  engine_bench   engine tok/s vs transformers generate() at batch 32 on a random model of
                 SmolLM2-135M's shape built from a config here (target >= 2x)

Writes gpu_check.json and gpu_check.txt under $OUT, or gpu-report/ when OUT is unset (--smoke: a
temporary directory), and ends with ratio lines (engine vs generate(), kernel vs copy bandwidth).
Nothing here needs a network; the whole run is meant to finish under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "proto"))     # the wire-contract package `lorafleet`

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=259, tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- (a) kernel tests


def kernel_tests(args: argparse.Namespace) -> dict:
    files = ["tests/unit/test_kernels_plan.py", "tests/unit/test_kernels_triton.py"]
    if not args.quick:
        files.append("tests/unit/test_kernels.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout)
    out = p.stdout + p.stderr
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return {"passed": p.returncode == 0, "command": " ".join(cmd[2:]), "returncode": p.returncode,
            "cuda_in_tests": torch.cuda.is_available(), "summary": summary[-1:] or ["(none)"],
            "output_tail": out[-3000:]}


# ---------------------------------------------------------------- (b) parity with transformers


def parity(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    from transformers import LlamaForCausalLM

    from server.engine.batch import Segment, make_forward_batch
    from server.engine.kv_cache import KVCache
    from server.model.default import resolve_model
    from server.model.loader import load_model

    dev = torch.device(args.device)
    model_dir = resolve_model("tiny", Path(tempfile.gettempdir()) / "lorafleet-gpu-check")
    model = load_model(model_dir, dev, dtype).model
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (1, 5, 17, 40)]
    kv, tables = KVCache.for_sequences(model.shape, [128] * len(prompts), dev, dtype)
    segs = [Segment(tables[i], token_ids=p, first_pos=0, want_logits=True) for i, p in enumerate(prompts)]
    with torch.inference_mode():
        ours = model.forward(make_forward_batch(segs, dev, kv.block_size), kv.layers).float()
        errs = []
        for i, p in enumerate(prompts):
            want = hf(torch.tensor([p], device=dev)).logits[0, -1].float()
            errs.append(float((ours[i] - want).norm() / want.norm()))
        prompt, n_new = prompts[2], 16
        ref = hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=n_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        kv, (table,) = KVCache.for_sequences(model.shape, [128], dev, dtype)
        out = model.forward(make_forward_batch([Segment(table, prompt, 0, True)], dev, kv.block_size), kv.layers)
        got: list[int] = []
        for _ in range(n_new):
            got.append(int(out[0].argmax()))
            batch = make_forward_batch([Segment(table, [got[-1]], len(prompt) + len(got) - 1, True)], dev,
                                       kv.block_size)
            out = model.forward(batch, kv.layers)
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), n_new)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = max(errs) <= tol and (dtype != torch.float32 or same == n_new)
    return {"passed": ok, "max_rel_logit_err": max(errs), "tolerance": tol,
            "greedy_tokens_matching_prefix": f"{same}/{n_new}"}


# ---------------------------------------------------------------- (c) kernel bandwidth


def copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), dev, 20)  # read + write


def kernel_bench(args: argparse.Namespace) -> dict:
    import server.kernels as K
    from server.kernels import reference

    dev = torch.device(args.device)
    S, r, T = 64, 16, 64
    d = 128 if args.quick else 4096  # quick: small enough for the Triton interpreter
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ranks = torch.full((S,), r)
    plan = K.make_plan(torch.randperm(S, generator=g).to(dev), ranks.to(dev))
    x = torch.randn(T, d, generator=g).to(dev, dt)
    A = (torch.randn(S, r, d, generator=g) / d**0.5).to(dev, dt)
    B = (torch.randn(S, r, d, generator=g) / r**0.5).to(dev, dt).transpose(1, 2)  # engine layout
    scale = torch.full((S,), 2.0, device=dev)
    y0 = torch.randn(T, d, generator=g).to(dev, dt)
    want = y0.float().clone()
    reference.lora(want, x.float(), A.float(), B.float(), scale, plan)
    moved = (A.numel() + B.numel() + x.numel() + 2 * y0.numel()) * 2  # bytes, each read once
    copy_bw = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (64 << 20))
    res: dict = {"shape": f"{S} adapters rank {r}, d={d}, {T} tokens, bf16",
                 "copy_GBps": copy_bw / 1e9, "bytes_per_call": moved}
    names = ["torch"] + (["triton"] if dev.type == "cuda" or args.interpret else [])
    for name in names:
        ops = K.select_backend(dev, name)
        y = y0.clone()
        ops.lora(y, x, A, B, scale, plan)
        err = float((y.float() - want).norm() / want.norm())
        reps, warm = (50, 3) if dev.type == "cuda" else (1, 0)
        t = median_seconds(lambda: ops.lora(y, x, A, B, scale, plan), dev, reps, warm)
        res[name] = {"rel_err_vs_reference": err, "us": t * 1e6, "GBps": moved / t / 1e9,
                     "share_of_copy": moved / t / copy_bw}
    best = res.get("triton", res["torch"])
    res["target"] = "triton share_of_copy >= 0.60"
    res["passed"] = all(res[n]["rel_err_vs_reference"] < 2e-2 for n in names) and (
        dev.type != "cuda" or best["share_of_copy"] >= 0.60)
    return res


# ---------------------------------------------------------------- (d) engine vs generate()


def build_model_dir(shape: dict, out: Path) -> Path:
    """A random Llama with this shape, saved as an HF dir with our byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.model.default import build_tokenizer

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    build_tokenizer().save(str(out / "tokenizer.json"))
    return out


def run_engine(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import FinishEvent, Sequence

    done = threading.Semaphore(0)
    outs: dict[int, list[int]] = {}

    def sink_for(i: int):
        def sink(ev):
            outs.setdefault(i, []).extend(ev.token_ids)
            if isinstance(ev, FinishEvent):
                done.release()
        return sink

    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        engine.submit(Sequence(str(i), p, params, sink_for(i)))
    for _ in prompts:
        if not done.acquire(timeout=300):
            raise TimeoutError("engine did not finish 32 requests within 300 s")
    return [outs[i] for i in range(len(prompts))]


def engine_bench(args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM

    from server.engine.engine import Engine
    from server.model.loader import load_model

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = TINY if args.quick else SMOL
    n_req, n_prompt, n_new = (4, 16, 8) if args.quick else (32, 32, 64)
    model_dir = build_model_dir(shape, Path(tempfile.mkdtemp(prefix="lorafleet-smol-")) / "m")
    loaded = load_model(model_dir, dev, dtype)
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 259, (n_prompt - 1,), generator=g).tolist() for _ in range(n_req)]
    ids = torch.tensor(prompts, device=dev)
    engine = Engine(loaded, max_batch_size=n_req, max_context_tokens=n_prompt + n_new + 8,
                    max_queued=2 * n_req, max_prefill_tokens=n_req * n_prompt)
    engine.start()
    try:
        def hf_run():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        t_ours = median_seconds(lambda: run_engine(engine, prompts, n_new), dev, 3)
        t_hf = median_seconds(hf_run, dev, 3)
        ours, theirs = run_engine(engine, prompts, n_new), hf_run()[:, n_prompt:].tolist()
    finally:
        engine.stop()
    total = n_req * n_new
    ratio = t_hf / t_ours
    return {"model": f"random, {shape}", "dtype": str(dtype), "batch": n_req,
            "prompt_tokens": n_prompt, "new_tokens": n_new,
            "engine_tok_s": total / t_ours, "hf_generate_tok_s": total / t_hf, "ratio": ratio,
            "target": "ratio >= 2.0", "identical_greedy_outputs": sum(a == b for a, b in zip(ours, theirs)),
            "passed": dev.type != "cuda" or ratio >= 2.0}


# ---------------------------------------------------------------- driver


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton"] = f"not importable: {err}"
    return env


def run_section(report: dict, name: str, fn: Callable[[], dict], deadline: float) -> None:
    t0 = time.perf_counter()
    if t0 > deadline:
        res = {"status": "skipped", "why": "the run's time budget was spent"}
    else:
        try:
            res = fn()
            res["status"] = "passed" if res.pop("passed") else "failed"
        except Exception as err:  # noqa: BLE001 - one section's failure must not lose the report
            res = {"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-3000:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    report["sections"][name] = res
    print(f"[{res['status']:>7}] {name} ({res['seconds']} s)", flush=True)


def text_report(report: dict) -> str:
    lines = [f"lorafleet gpu-check  {report['started']}", json.dumps(report["environment"]), ""]
    for name, res in report["sections"].items():
        lines.append(f"== {name}: {res['status']} ({res['seconds']} s)")
        for k, v in res.items():
            if k in ("status", "seconds"):
                continue
            text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            lines.append(f"   {k}: {text if k not in ('output_tail', 'traceback') else chr(10) + text}")
    return "\n".join(lines) + "\n"


def ratio_lines(report: dict) -> list[str]:
    """The headline ratios of the sections that ran (STYLE.md rule 7), one line each."""
    lines, dev = [], report["args"]["device"]
    engine = report["sections"].get("engine_bench", {})
    if "ratio" in engine:
        lines.append(f"ratio: engine tok/s / transformers generate() tok/s = {engine['ratio']:.2f} on {dev} "
                     "(target >= 2 on CUDA)")
    kernels = report["sections"].get("kernel_bench", {})
    for name in ("torch", "triton"):
        if name in kernels:
            lines.append(f"ratio: {name} lora kernel bandwidth / device copy bandwidth = "
                         f"{kernels[name]['share_of_copy']:.3f} on {dev} (target for triton >= 0.60 on CUDA)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes and fewer tests (dry run)")
    ap.add_argument("--budget-s", type=float, default=450, help="skip sections that start after this")
    ap.add_argument("--test-timeout", type=int, default=240)
    ap.add_argument("--only", default="", help="comma-separated section names")
    ap.add_argument("--smoke", action="store_true", help="the CPU dry run (--device cpu --quick) of every section "
                    "but kernel_tests, which `make test` runs anyway; seconds")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.quick = "cpu", True
        args.only = args.only or "parity_fp32,parity_bf16,kernel_bench,engine_bench"
    args.interpret = os.environ.get("TRITON_INTERPRET") == "1"
    default_out = Path(tempfile.mkdtemp(prefix="lorafleet-gpu-check-")) if args.smoke else ROOT / "gpu-report"
    out_dir = Path(os.environ.get("OUT") or default_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
              "environment": environment(), "sections": {}}
    deadline = time.perf_counter() + args.budget_s
    sections = {
        "kernel_tests": lambda: kernel_tests(args),
        "parity_fp32": lambda: parity(args, torch.float32),
        "parity_bf16": lambda: parity(args, torch.bfloat16),
        "kernel_bench": lambda: kernel_bench(args),
        "engine_bench": lambda: engine_bench(args),
    }
    only = set(filter(None, args.only.split(",")))
    for name, fn in sections.items():
        if not only or name in only:
            run_section(report, name, fn, deadline)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "gpu_check.txt").write_text(text_report(report))
    print(text_report(report))
    print("\n".join(ratio_lines(report)))
    return 0 if all(s["status"] == "passed" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
