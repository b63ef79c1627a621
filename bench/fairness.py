"""Fairness under a flood (issue 16, finding 3): tenant B's short Generate while tenant A floods
the server with 64 long prompts, against B's latency on an idle server, measured in one run.

Target: B's whole 8-token Generate <= 4 x its idle latency + 0.5 s, at the default settings.

    .venv/bin/python bench/fairness.py [--model tiny|random-512|DIR|''] [--flood 64] [--repeats 3]
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
from server.config import ServerConfig  # noqa: E402
from server.main import BackgroundServer, keep_freed_memory, load  # noqa: E402


def b_latency(port: int, key: str) -> float:
    with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=300) as c:
        t0 = time.perf_counter()
        r = c.generate("Name a colour.", max_new_tokens=8, ignore_eos=True)
        assert r.completion_tokens == 8
        return time.perf_counter() - t0


def flood(port: int, key: str, n: int, prompt: str, stop: threading.Event) -> None:
    def one(i: int) -> None:
        with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=600) as c:
            try:
                c.generate(prompt + str(i), max_new_tokens=1)
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
    a = p.parse_args()
    keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-fair-"))
    keys = work / "keys.json"
    ka, kb = create_key(keys, "flood", False), create_key(keys, "lone", False)
    cfg = ServerConfig(port=0, metrics_port=-1, model=a.model, data_dir=work / "data", api_keys=keys,
                       max_queued_requests=512)
    loaded = load(cfg)
    tok = loaded.tokenizer
    long_prompt = ""
    while len(tok.encode(long_prompt + "the sky ").ids) < cfg.max_prompt_tokens - 16:
        long_prompt += "the sky "
    idle, loaded_lat = [], []
    with BackgroundServer(cfg, loaded) as srv:
        b_latency(srv.port, kb)                      # warm-up
        for _ in range(a.repeats):
            idle.append(b_latency(srv.port, kb))
            stop = threading.Event()
            t = threading.Thread(target=flood, args=(srv.port, ka, a.flood, long_prompt, stop), daemon=True)
            t.start()
            time.sleep(0.3)
            loaded_lat.append(b_latency(srv.port, kb))
            stop.set()
            deadline = time.monotonic() + 600
            while srv.engine.scheduler.has_work() or srv.engine.queued():
                if time.monotonic() > deadline:
                    raise SystemExit("the flood did not drain in 10 minutes")
                time.sleep(0.1)
    i, f = statistics.median(idle), statistics.median(loaded_lat)
    target = 4 * i + 0.5
    print(f"model {loaded.name}: B idle {i:.3f} s, B under a flood of {a.flood} x "
          f"{len(tok.encode(long_prompt).ids)}-token prompts {f:.3f} s, ratio {f / i:.1f}x; "
          f"target <= 4 x idle + 0.5 s = {target:.3f} s: {'met' if f <= target else 'MISSED'}")
    print(json.dumps({"idle_s": idle, "flooded_s": loaded_lat}))


if __name__ == "__main__":
    main()
