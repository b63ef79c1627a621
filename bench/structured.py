"""Constrained decoding's cost through the real server (issue 23): 32 concurrent chat requests over
8 LoRA adapters, each constrained by a JSON schema (`response_format`), against the same requests
unconstrained, in one run, through the OpenAI-compatible door; throughput is generated tokens per
second of wall time over the whole batch. Beside it, the schema compile time (cache misses: each
schema distinct) as p50.

Target: constrained / unconstrained throughput >= 0.9.

    .venv/bin/python bench/structured.py [--model tiny|random-512|DIR|''] [--requests 32] [--adapters 8]
                                         [--max-tokens 64] [--repeats 3] [--smoke]

--smoke: the tiny model, 8 requests over 2 adapters, 16 tokens, one repeat (seconds; `make test` runs it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "proto"))

import openai  # noqa: E402

from client import LoraFleetClient  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.constraints import Constraint, ConstraintCompiler, Limits, TokenizerInfo  # noqa: E402
from server.main import BackgroundServer, keep_freed_memory, load  # noqa: E402
from server.model.default import resolve_model  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "city", "tags", "employed"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                         "city": {"type": "string", "maxLength": 24},
                         "tags": {"type": "array", "items": {"enum": ["admin", "dev", "ops", "sales"]}, "maxItems": 3},
                         "employed": {"type": "boolean"}}}
PROMPT = "Invent a person and describe them as JSON with name, age, city, tags and employed. Person #{i}:"


def adapters(model_dir: Path, work: Path, n: int) -> list[Path]:
    """n LoRAs on the served base (made by peft, random non-zero weights)."""
    from tests.serving_fixtures import make_adapter
    return [make_adapter(model_dir, work / "peft", "lora", seed)[0] for seed in range(1, n + 1)]


def batch(api: openai.OpenAI, names: list[str], n: int, max_tokens: int, constrained: bool,
          chat: bool) -> tuple[int, float, int]:
    """(completion tokens, wall seconds, requests whose reply is valid JSON) of n concurrent requests:
    chat with `response_format` (a model without a chat template: completions with vLLM's
    `structured_outputs.json`, the same constraint)."""
    def one(i: int):
        ask = dict(model=names[i % len(names)], max_tokens=max_tokens, temperature=1.0, seed=i)
        if chat:
            fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
            r = api.chat.completions.create(messages=[{"role": "user", "content": PROMPT.format(i=i)}], **ask,
                                            **(fmt if constrained else {}))
            return r.usage.completion_tokens, r.choices[0].message.content
        extra = {"structured_outputs": {"json": PERSON}} if constrained else {}
        r = api.completions.create(prompt=PROMPT.format(i=i), extra_body=extra, **ask)
        return r.usage.completion_tokens, r.choices[0].text
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    valid = 0
    for _, text in got:
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass
    return sum(t for t, _ in got), wall, valid


def compile_p50(loaded, count: int) -> float:
    """Median seconds to compile `count` distinct JSON schemas (each a cache miss)."""
    info = TokenizerInfo(loaded.tokenizer, loaded.model.shape.vocab_size, loaded.eos_ids)
    compiler = ConstraintCompiler(info, Limits(compile_timeout_s=60))
    times = []
    for i in range(count):
        schema = {**PERSON, "properties": {**PERSON["properties"], f"extra_{i}": {"type": "integer"}}}
        t0 = time.perf_counter()
        compiler.compile(Constraint("json_schema", json.dumps(schema)), "schema")
        times.append(time.perf_counter() - t0)
    compiler.close()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model spec as for the server's --model ('' = the default)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 requests, 2 adapters: checks it runs")
    a = p.parse_args()
    if a.smoke:
        a.model, a.requests, a.adapters, a.max_tokens, a.repeats = "tiny", 8, 2, 16, 1
    keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-structured-"))
    cfg = ServerConfig(port=0, metrics_port=-1, http_port=0, model=a.model, data_dir=work / "data",
                       max_batch_size=max(32, a.requests), max_new_tokens=max(64, a.max_tokens))
    loaded = load(cfg)
    model_dir = resolve_model(cfg.model or None, cfg.cache_dir)
    runs = {True: [], False: []}
    chat = loaded.chat is not None
    with BackgroundServer(cfg, loaded) as srv:
        names = [f"a{i}" for i in range(a.adapters)]
        with LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=300) as c:
            for name, path in zip(names, adapters(model_dir, work, a.adapters)):
                c.upload_adapter(path, name)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="none", max_retries=0,
                            timeout=600)
        batch(api, names, min(4, a.requests), 4, True, chat)          # warm-up: adapters resident, schema compiled
        for _ in range(a.repeats):
            for constrained in (False, True):
                runs[constrained].append(batch(api, names, a.requests, a.max_tokens, constrained, chat))
    p50 = compile_p50(loaded, 5 if a.smoke else 20)

    def rate(rs):
        return sum(t for t, _, _ in rs) / sum(w for _, w, _ in rs)
    free, bound = rate(runs[False]), rate(runs[True])
    valid = sum(v for _, _, v in runs[True])
    total = a.requests * a.repeats
    print(f"model {loaded.name}: {a.requests} concurrent requests over {a.adapters} adapters, max_tokens "
          f"{a.max_tokens}, {a.repeats} repeats: unconstrained {free:.1f} tok/s, JSON-schema constrained "
          f"{bound:.1f} tok/s ({valid}/{total} constrained replies parse as JSON; the rest ran out of max_tokens)")
    print(f"ratio: constrained / unconstrained throughput = {bound / free:.2f} (target >= 0.9)   "
          f"schema compile p50 = {p50 * 1000:.2f} ms")
    print(json.dumps({"unconstrained_tok_s": free, "constrained_tok_s": bound, "compile_p50_s": p50,
                      "valid_json": valid, "requests": total}))


if __name__ == "__main__":
    main()
