"""Prefix caching (issue 22): multi-turn chats of many tenants, each on its own LoRA, cache on vs off.

SmolLM2-135M-Instruct (--model), the server's own engine wiring (`build_adapters`, `build_engine`: the
KV budget, block size and scheduler budgets of `make serve`), 8 tenants, each with its own 300-token
system prompt and its own rank-8 LoRA (q/k/v/o), 4 chat turns: every turn re-sends the whole history
(system prompt, earlier questions and the model's own answers) plus a 24-token question, and gets a
24-token answer (greedy, EOS ignored). The 8 tenants' turn k are submitted together; turn k+1 follows
when all 8 answered. Reported, cache on vs off (fresh engines each run, interleaved on/off, medians of
--repeats):
  TTFT of turns 2-4 (median over tenants and turns)   target on/off <= 0.3
  throughput: generated tokens / wall time of the whole workload   target on/off >= 1.5
  hit rate: KV positions found in the prefix cache / positions needed, turns 2-4 (and all turns)
The answers with the cache on must equal the answers with it off, token for token (checked).

    PYTHONPATH=.:proto .venv/bin/python bench/prefix_cache.py [--model SPEC] [--repeats 2] [--quick] [--smoke]

--quick: one repeat (two runs, a few minutes on 2 cores). --smoke: the tiny model, 2 tenants, a
40-token system prompt, 2 turns of 8-token questions and 4-token answers (seconds; `make test` runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafleet.archive import archive_dir  # noqa: E402
from server.adapters.refs import parse_tenant_ref  # noqa: E402
from server.config import ServerConfig, resolve_context  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import FinishEvent, Sequence  # noqa: E402
from server.main import build_adapters, build_engine, keep_freed_memory, model_context  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.loader import load_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Work:
    tenants: int = 8
    system_tokens: int = 300
    turns: int = 4
    question_tokens: int = 24
    answer_tokens: int = 24


def make_lora(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out))
    return out


def conversation(turns_ids: list[list[int]], system: list[int], answers: list[list[int]]) -> list[int]:
    """The history a chat client re-sends: system prompt, then each question and (but for the
    last) its answer."""
    ids = list(system)
    for k, q in enumerate(turns_ids):
        ids += q
        if k < len(answers):
            ids += answers[k]
    return ids


def run_workload(engine, registry, w: Work, systems, questions) -> dict:
    """All turns of all tenants on one engine: per turn and tenant, TTFT, answer, hit/need positions."""
    answers: list[list[list[int]]] = [[] for _ in range(w.tenants)]
    ttft: list[list[float]] = []
    hits = [[0, 0] for _ in range(w.turns)]
    t0 = time.perf_counter()
    for k in range(w.turns):
        done = threading.Semaphore(0)
        seqs = []
        for t in range(w.tenants):
            tenant = f"tenant{t}"
            prompt = conversation(questions[t][:k + 1], systems[t], answers[t])
            ref = registry.resolve(parse_tenant_ref(tenant, "bot"))
            out: list[int] = []

            def sink(ev, out=out) -> None:
                out.extend(ev.token_ids)
                if isinstance(ev, FinishEvent):
                    done.release()
            seq = Sequence(f"{t}-{k}", prompt, SamplingParams(max_new_tokens=w.answer_tokens, ignore_eos=True),
                           sink, tenant=tenant)
            engine.submit(seq, ref)
            seqs.append((seq, out))
        for _ in seqs:
            done.acquire()
        ttft.append([s.first_token_at - s.arrival for s, _ in seqs])
        for t, (s, out) in enumerate(seqs):
            answers[t].append(out)
            hits[k][0] += s.cached_tokens
            hits[k][1] += s.num_positions - len(s.output_ids)
    wall = time.perf_counter() - t0
    return {"wall": wall, "ttft": ttft, "answers": answers, "hits": hits,
            "tokens": w.tenants * w.turns * w.answer_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 tenants, 2 short turns: checks it runs")
    args = ap.parse_args()
    w = Work()
    if args.quick:
        args.repeats = 1
    if args.smoke:
        args.model, args.repeats = "tiny", 1
        w = Work(tenants=2, system_tokens=40, turns=2, question_tokens=8, answer_tokens=4)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, w, Path(tmp))


def measure(args, w: Work, work: Path) -> None:
    base_dir = resolve_model(args.model, Path.home() / ".cache/lorafleet/models")
    loaded = load_model(base_dir, torch.device("cpu"), torch.float32)
    cfg = resolve_context(ServerConfig(data_dir=work / "store", tenant_max_adapter_bytes=1 << 40),
                          model_context(loaded))
    _store, serving = build_adapters(cfg, loaded)
    print(f"building {w.tenants} LoRA r8 (q/k/v/o), one per tenant, on {base_dir.name} ...", flush=True)
    for t in range(w.tenants):
        serving.registry.put(f"tenant{t}", "bot", archive_dir(make_lora(base_dir, work / f"l{t}", t)))
    g = torch.Generator().manual_seed(0)
    hi = min(loaded.model.shape.vocab_size, 20000)
    systems = [[1] + torch.randint(3, hi, (w.system_tokens - 1,), generator=g).tolist() for _ in range(w.tenants)]
    questions = [[torch.randint(3, hi, (w.question_tokens,), generator=g).tolist() for _ in range(w.turns)]
                 for _ in range(w.tenants)]

    def one(prefix_cache: bool) -> dict:
        engine = build_engine(dataclasses.replace(cfg, no_prefix_cache=not prefix_cache), loaded, serving)
        engine.start()
        try:
            return run_workload(engine, serving.registry, w, systems, questions)
        finally:
            engine.stop()

    kv = build_engine(cfg, loaded, serving).kv
    print(f"KV cache: {kv.blocks.capacity} blocks of {kv.block_size} tokens ({kv.nbytes / 2**20:.0f} MiB); "
          f"{w.tenants} tenants x ({w.system_tokens}-token system prompt + {w.turns} turns of "
          f"{w.question_tokens}-token questions, {w.answer_tokens}-token answers); {torch.get_num_threads()} threads",
          flush=True)
    del kv
    one(True)                                           # warm-up: adapters resident, allocator warm
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):                       # interleaved
        for on in (True, False):
            runs[on].append(one(on))
    for r_on, r_off in zip(runs[True], runs[False]):
        assert r_on["answers"] == r_off["answers"], "prefix cache on and off gave different answers"

    def med_ttft(rs: list[dict], turns: slice) -> float:
        return statistics.median(x for r in rs for per_turn in r["ttft"][turns] for x in per_turn)

    print(f"{'':<22}{'cache on':>12}{'cache off':>12}")
    for k in range(w.turns):
        print(f"{'TTFT turn ' + str(k + 1) + ' (ms)':<22}{1e3 * med_ttft(runs[True], slice(k, k + 1)):>12.0f}"
              f"{1e3 * med_ttft(runs[False], slice(k, k + 1)):>12.0f}")
    tput = {on: statistics.median(r["tokens"] / r["wall"] for r in rs) for on, rs in runs.items()}
    print(f"{'throughput (tok/s)':<22}{tput[True]:>12.1f}{tput[False]:>12.1f}")
    later = slice(1, w.turns)
    hit = sum(h for r in runs[True] for h, _ in r["hits"][later]) / max(1, sum(n for r in runs[True]
                                                                            for _, n in r["hits"][later]))
    hit_all = sum(h for r in runs[True] for h, _ in r["hits"]) / max(1, sum(n for r in runs[True] for _, n in r["hits"]))
    ttft_ratio = med_ttft(runs[True], later) / med_ttft(runs[False], later)
    print(f"answers identical with the cache on and off: yes ({len(runs[True])} x {w.tenants * w.turns} requests)")
    print(f"ratio: TTFT turns 2-{w.turns} on/off = {ttft_ratio:.2f} (target <= 0.3)   "
          f"throughput on/off = {tput[True] / tput[False]:.2f} (target >= 1.5)")
    print(f"ratio: prefix-cache hit rate turns 2-{w.turns} = {hit:.2f}   all turns = {hit_all:.2f}")


if __name__ == "__main__":
    main()
