"""torch.compile (inductor, CPU) of the decode forward against the eager forward, interleaved (issue 24).

Not a server path: the probe behind the README's "A compiled decode step" line, kept so the
measurement can be repeated (`--smoke`, which `make test` runs: the tiny model at batch 1, so the
probe cannot rot). The
model's forward is compiled as it is, with two changes only the probe makes: every `BaseLinear`
call becomes an opaque custom op (inductor cannot take oneDNN's prepacked weights as graph inputs),
and the decode batch reads K/V through the gathered path (`decode_views=None`: the in-place views are
built from Python ints dynamo would guard on). No adapter hooks; the RoPE table is grown beforehand.
Static shapes (one compile per batch size, as a padded bucket would be) unless --dynamic.

    PYTHONPATH=.:proto .venv/bin/python bench/compile_probe.py [--batches 1,32] [--threads 2] [--dynamic] [--model SPEC] [--smoke]

Prints compile seconds, the largest |compiled - eager| on the hidden states, and per batch the
median over rounds of eager ms / compiled ms (each round runs both back to back).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import set_thread_env  # noqa: E402
set_thread_env()          # OpenMP defaults, before torch loads libgomp (server/config.py)

import torch  # noqa: E402

import server.model.linear as linear  # noqa: E402
from server.engine.batch import Segment, make_forward_batch  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.model.default import resolve_model  # noqa: E402
from server.model.llama import LlamaModel  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.model.shape import TARGET_WEIGHT  # noqa: E402

LINEARS: dict[int, linear.BaseLinear] = {}
_eager_call = linear.BaseLinear.__call__


@torch.library.custom_op("lorafleet_probe::base_linear", mutates_args=())
def base_linear(x: torch.Tensor, key: int, d_out: int) -> torch.Tensor:
    return _eager_call(LINEARS[key], x)


@base_linear.register_fake
def _(x, key, d_out):
    return x.new_empty(x.shape[0], d_out)


def _call(self, x):
    if torch.compiler.is_compiling():
        return torch.ops.lorafleet_probe.base_linear(x, id(self), self.d_out)
    return _eager_call(self, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, batch 1, 2 rounds: checks it runs")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batches, args.rounds, args.context = "tiny", "1", 2, 16
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.model, Path.home() / ".cache/lorafleet/models"), torch.device("cpu"),
                       torch.float32).model
    for lw in model.layers:
        for name in TARGET_WEIGHT.values():
            LINEARS[id(getattr(lw, name))] = getattr(lw, name)
    linear.BaseLinear.__call__ = _call
    model.rope(torch.tensor([args.context + 8]))                       # grow the table outside the graph
    model.rope = lambda p: (model._cos[p].unsqueeze(1), model._sin[p].unsqueeze(1))
    inner = torch.compile(LlamaModel.forward.__wrapped__, dynamic=args.dynamic)

    def compiled(batch, kv):
        with torch.no_grad():                                          # inference_mode + mutated inputs: no
            return inner(model, batch, kv, return_hidden=True)

    for B in (int(b) for b in args.batches.split(",")):
        kv, tables = KVCache.for_sequences(model.shape, [args.context + 8] * B, model.device, model.dtype)
        model.forward(make_forward_batch([Segment(tables[i], [5] * args.context, 0, True) for i in range(B)],
                                         model.device, kv.block_size), kv.layers)
        batch = make_forward_batch([Segment(tables[i], [5], args.context, True) for i in range(B)], model.device,
                                   kv.block_size)
        batch = dataclasses.replace(batch, decode_views=None)
        ref = model.forward(batch, kv.layers, return_hidden=True)
        t0 = time.perf_counter()
        diff = (compiled(batch, kv.layers) - ref).abs().max().item()
        took = time.perf_counter() - t0
        eager, comp = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            model.forward(batch, kv.layers, return_hidden=True)
            eager.append(time.perf_counter() - t)
            t = time.perf_counter()
            compiled(batch, kv.layers)
            comp.append(time.perf_counter() - t)
        print(f"decode b{B}: compile {took:.0f} s, max |compiled - eager| {diff:.1e}, eager {1e3 * statistics.median(eager):.0f} ms,"
              f" compiled {1e3 * statistics.median(comp):.0f} ms")
        print(f"ratio: decode b{B} eager / compiled = {statistics.median(e / c for e, c in zip(eager, comp)):.2f}", flush=True)


if __name__ == "__main__":
    main()
