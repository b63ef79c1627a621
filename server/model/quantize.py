"""`--quantize int8`: turn the model's base linears into int8 `BaseLinear`s (server/model/linear.py),
with the outlier input channels (kept in fp32) found by a calibration pass through the model's own forward."""
from __future__ import annotations

import dataclasses

import torch

from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import KVCache
from server.model.llama import LlamaModel
from server.model.shape import TARGET_WEIGHT

QUANTIZE = ("none", "bf16", "int8")
HEAD = (-1, "lm_head")        # calibrate()'s key for the LM head's input (the final norm's output)


def quantize_model(model: LlamaModel, quantize: str) -> LlamaModel:
    """`--quantize`, on a float32 CPU model, in place: "none" leaves it as loaded (exact); "bf16"
    puts the weights and matmuls of every base linear (not the LM head) in bf16, activations staying
    fp32; "int8" turns every base linear and the LM head into int8. Embeddings, norms, attention,
    adapters and the KV cache stay in the model's dtype. Returns the model."""
    if quantize == "none":
        return model
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"--quantize {quantize} runs on CPU with float32 activations (--device cpu --dtype float32)")
    if quantize == "bf16":
        for lw in model.layers:
            for name in TARGET_WEIGHT.values():
                setattr(lw, name, getattr(lw, name).bf16_weights())
        return model
    act_max = calibrate(model)
    for i, lw in enumerate(model.layers):
        for target, name in TARGET_WEIGHT.items():
            setattr(lw, name, getattr(lw, name).quantized(act_max[(i, target)]))
    model.lm_head = model.lm_head.quantized(act_max[HEAD])
    return model


class _Calibration:
    """Adapter hooks that change nothing and record max |x_j| of every base linear's input."""

    def __init__(self):
        self.act_max: dict[tuple[int, str], torch.Tensor] = {}   # (layer, target) -> [d_in]

    def embed(self, h):
        return h

    def pre_linear(self, layer, target, x):
        m = x.abs().amax(0)
        key = (layer, target)
        self.act_max[key] = torch.maximum(self.act_max[key], m) if key in self.act_max else m
        return x

    def post_linear(self, layer, target, x, y):
        return y

    def block_out(self, layer, place, h):
        return h


def calibrate(model: LlamaModel, sequences: int = 4, tokens: int = 64, seed: int = 0
              ) -> dict[tuple[int, str], torch.Tensor]:
    """max |x_j| [d_in] of every base linear's input over a few seeded random-token prompts
    (outlier channels belong to the model, not to the text), keyed (layer, target), and of the LM
    head's input keyed HEAD. Each prompt is one sequence's prefill through the model's forward, in a
    KV cache of its own."""
    a, dev = model.shape, model.device
    g = torch.Generator().manual_seed(seed)
    hooks = _Calibration()
    for _ in range(sequences):
        ids = torch.randint(0, a.vocab_size, (tokens,), generator=g).tolist()
        kv, (table,) = KVCache.for_sequences(a, [tokens], dev, model.dtype)
        batch = make_forward_batch([Segment(table, ids, 0, True)], dev, kv.block_size)
        batch = dataclasses.replace(batch, logit_rows=torch.arange(tokens, device=dev))
        h = model.forward(batch, kv.layers, hooks, return_hidden=True).abs().amax(0)   # [hidden]
        hooks.act_max[HEAD] = torch.maximum(hooks.act_max[HEAD], h) if HEAD in hooks.act_max else h
    return hooks.act_max
