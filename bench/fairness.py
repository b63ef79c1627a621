"""Fairness under a flood (issue 16 finding 3, issue 20 finding 9): tenant B's short Generate while
tenant A floods the server, against B's latency on an idle server, measured in one run. Two floods:
`generate` (64 concurrent Generates of long prompts) and `classify` (one Classify of 64 long texts
through a LoRA with a classification head).

Target: B's whole 8-token Generate <= 4 x its idle latency + 0.5 s, at the default settings.

    .venv/bin/python bench/fairness.py [--model tiny|random-512|DIR|''] [--flood 64] [--repeats 3]
                                       [--kinds generate,classify] [--smoke]

--smoke: the tiny model, floods of 8, one repeat (seconds; `make test` runs it).
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
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "proto"))

from client import LoraFleetClient  # noqa: E402
from server.api.auth import create_key  # noqa: E402
from server.config import ServerConfig, resolve_context  # noqa: E402
from server.main import BackgroundServer, keep_freed_memory, load, model_context  # noqa: E402
from server.model.default import resolve_model  # noqa: E402


def b_latency(port: int, key: str) -> float:
    with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=300) as c:
        t0 = time.perf_counter()
        r = c.generate("Name a colour.", max_new_tokens=8, ignore_eos=True)
        assert r.completion_tokens == 8
        return time.perf_counter() - t0


def classify_flood(port: int, key: str, n: int, prompt: str, stop: threading.Event) -> None:
    with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=600) as c:
        try:
            c.classify([f"{i} {prompt}" for i in range(n)], adapter="cls")
        except Exception as e:  # noqa: BLE001 - the flood only has to be there
            print(f"classify flood failed: {e}", file=sys.stderr)
    stop.wait()


def cls_adapter(model_dir: Path, work: Path) -> Path:
    """A LoRA with a 3-label head on the served base (made by peft, random weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serving_fixtures import make_cls_adapter
    return make_cls_adapter(model_dir, work / "cls", seed=1)[0]


def flood(port: int, key: str, n: int, prompt: str, stop: threading.Event) -> None:
    def one(i: int) -> None:
        with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=600) as c:
            try:
                c.generate(f"{i} {prompt}", max_new_tokens=1)
            except Exception as e:  # noqa: BLE001 - the flood only has to be there
                print(f"flood request failed: {e}", file=sys.stderr)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model spec as for the server's --model ('' = the default)")
    p.add_argument("--flood", type=int, default=64, help="tenant A's concurrent long requests")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default="generate,classify", help="floods to run: generate, classify")
    p.add_argument("--decode-prefill-tokens", type=int, default=ServerConfig.decode_prefill_tokens,
                   help="the server's --decode-prefill-tokens (default: its default)")
    p.add_argument("--smoke", action="store_true", help="tiny model, floods of 8, one repeat: checks it runs")
    a = p.parse_args()
    if a.smoke:
        a.model, a.flood, a.repeats = "tiny", 8, 1
    kinds = [k for k in a.kinds.split(",") if k]
    keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-fair-"))
    keys = work / "keys.json"
    ka, kb = create_key(keys, "flood", False), create_key(keys, "lone", False)
    doc = json.loads(keys.read_text())
    doc["keys"][0]["quotas"] = {"max_queued_requests": 4096, "max_concurrent_requests": 4096}  # A's own quota is huge
    keys.write_text(json.dumps(doc))
    cfg = ServerConfig(port=0, metrics_port=-1, model=a.model, data_dir=work / "data", api_keys=keys,
                       max_classify_batch=max(64, a.flood), decode_prefill_tokens=a.decode_prefill_tokens)
    loaded = load(cfg)
    cfg = resolve_context(cfg, model_context(loaded))       # the prompt limit the server will apply
    tok = loaded.tokenizer
    long_prompt = ""
    while len(tok.encode(long_prompt + "the sky ").ids) < min(420, cfg.max_prompt_tokens - 16):
        long_prompt += "the sky "
    assert long_prompt, f"no room for a long prompt under --max-prompt-tokens {cfg.max_prompt_tokens}"
    results = {}
    with BackgroundServer(cfg, loaded) as srv:
        if "classify" in kinds:
            with LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=ka, timeout=300) as c:
                c.upload_adapter(cls_adapter(resolve_model(cfg.model or None, cfg.cache_dir), work), "cls")
        b_latency(srv.port, kb)                      # warm-up
        for kind in kinds:
            idle, flooded = [], []
            for _ in range(a.repeats):
                idle.append(b_latency(srv.port, kb))
                stop = threading.Event()
                target = classify_flood if kind == "classify" else flood
                # each flood prompt differs from its first token and from every repeat's (the flood
                # request's number first): the prefix cache cannot make the flood cheaper than new traffic
                prompt = f"{kind} {len(idle)} {long_prompt}"
                t = threading.Thread(target=target, args=(srv.port, ka, a.flood, prompt, stop), daemon=True)
                t.start()
                time.sleep(0.3)
                flooded.append(b_latency(srv.port, kb))
                stop.set()
                deadline = time.monotonic() + 600
                while srv.engine.scheduler.has_work() or srv.engine.queued():
                    if time.monotonic() > deadline:
                        raise SystemExit("the flood did not drain in 10 minutes")
                    time.sleep(0.1)
            results[kind] = (idle, flooded)
    n = len(tok.encode(long_prompt).ids)
    for kind, (idle, flooded) in results.items():
        i, f = statistics.median(idle), statistics.median(flooded)
        target = 4 * i + 0.5
        print(f"ratio: model {loaded.name}, {kind} flood of {a.flood} x {n}-token prompts: B flooded / B idle = "
              f"{f / i:.1f} (idle {i:.3f} s, flooded {f:.3f} s); target <= 4 x idle + 0.5 s = {target:.3f} s: "
              f"{'met' if f <= target else 'MISSED'}")
    print(json.dumps({k: {"idle_s": v[0], "flooded_s": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
