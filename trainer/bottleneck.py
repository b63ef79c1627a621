"""Bottleneck adapters (Houlsby / Pfeiffer) on a Hugging Face Llama-family model, as forward hooks.

Semantics (server/adapters/formats.py, "Bottleneck format"): on the attention block output (after
o_proj) and/or the MLP block output (after down_proj), before the residual add,
    h_out = h + up.weight @ act(down.weight @ h + down.bias) + up.bias
`up` starts at zero, so a fresh adapter is the identity. Parameter names of `BottleneckAdapters`
are exactly the format's tensor names: layers.{i}.{attn|mlp}_adapter.{down|up}.{weight|bias}.
Serialisation goes through formats.write_bottleneck; loading through the server's parser.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from server.adapters.weights import AdapterKind, AdapterWeights, BottleneckTarget, ClassificationHead
from server.model.shape import BaseModelShape
from server.kernels.activation import Activation



class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(hidden, size)  # weight [size, hidden], bias [size]
        self.up = nn.Linear(size, hidden)  # weight [hidden, size], bias [hidden]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [..., hidden]
        return h + self.up(Activation.of(self.activation).fn(self.down(h)))


class BottleneckLayer(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str, placement: tuple[str, ...]):
        super().__init__()
        self.attn_adapter = Bottleneck(hidden, size, activation) if "attn" in placement else None
        self.mlp_adapter = Bottleneck(hidden, size, activation) if "mlp" in placement else None


class BottleneckAdapters(nn.Module):
    """layers[i].{attn,mlp}_adapter for every decoder layer (a place absent from `placement` is None)."""

    def __init__(self, num_layers: int, hidden: int, size: int, activation: str, placement: tuple[str, ...]):
        super().__init__()
        self.size, self.activation, self.placement = size, activation, tuple(sorted(placement))
        self.layers = nn.ModuleList(BottleneckLayer(hidden, size, activation, placement) for _ in range(num_layers))

    def targets(self) -> dict[tuple[int, str], BottleneckTarget]:
        """(layer, "attn"|"mlp") -> detached float32 CPU tensors, for formats.write_bottleneck."""
        out = {}
        for i, layer in enumerate(self.layers):
            for place in ("attn", "mlp"):
                a = getattr(layer, f"{place}_adapter")
                if a is not None:
                    out[(i, place)] = BottleneckTarget(
                        down=_cpu(a.down.weight), down_bias=_cpu(a.down.bias),
                        up=_cpu(a.up.weight), up_bias=_cpu(a.up.bias), activation=self.activation)
        return out

    @staticmethod
    def from_weights(weights: AdapterWeights, base: BaseModelShape) -> "BottleneckAdapters":
        """Rebuild from what the server's parser returns (a layer may lack a place: it stays identity)."""
        t0 = next(iter(weights.bottleneck.values()))
        placement = tuple(sorted({p for _, p in weights.bottleneck}))
        adapters = BottleneckAdapters(base.num_layers, base.hidden_size, t0.down.shape[0], t0.activation, placement)
        with torch.no_grad():  # `up` starts at zero: a (layer, place) the file lacks stays the identity
            for (i, place), t in weights.bottleneck.items():
                a = getattr(adapters.layers[i], f"{place}_adapter")
                a.down.weight.copy_(t.down)
                a.up.weight.copy_(t.up)
                a.down.bias.copy_(t.down_bias if t.down_bias is not None else torch.zeros_like(a.down.bias))
                a.up.bias.copy_(t.up_bias if t.up_bias is not None else torch.zeros_like(a.up.bias))
        return adapters


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face *ForCausalLM / *ForSequenceClassification."""
    return getattr(model, model.base_model_prefix).layers


def _hook(adapter: Bottleneck):
    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, tuple):  # self_attn returns (attn_output [B, T, hidden], attn_weights)
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)  # mlp returns [B, T, hidden]
    return hook


class BottleneckModel(nn.Module):
    """`base` with `adapters` hooked onto each layer's self_attn / mlp output. Call like the base model."""

    def __init__(self, base: nn.Module, adapters: BottleneckAdapters):
        super().__init__()
        self.base, self.adapters = base, adapters
        layers = decoder_layers(base)
        if len(layers) != len(adapters.layers):
            raise ValueError(f"adapters for {len(adapters.layers)} layers, model has {len(layers)}")
        for layer, ad in zip(layers, adapters.layers):
            if ad.attn_adapter is not None:
                layer.self_attn.register_forward_hook(_hook(ad.attn_adapter))
            if ad.mlp_adapter is not None:
                layer.mlp.register_forward_hook(_hook(ad.mlp_adapter))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw):  # [B, T] each
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **kw)


def head_of(model: BottleneckModel, labels: tuple[str, ...]) -> ClassificationHead | None:
    score = getattr(model.base, "score", None)
    if not labels or score is None:
        return None
    return ClassificationHead(_cpu(score.weight), None if score.bias is None else _cpu(score.bias), labels)


def read_bottleneck(directory: Path, base: BaseModelShape) -> AdapterWeights:
    """Parse a bottleneck adapter directory with the server's own validator and parser."""
    from server.adapters import formats
    from server.adapters.validate import AdapterLimits, parse_files

    directory = Path(directory)
    return parse_files((directory / formats.CONFIG_FILE).read_bytes(),
                       (directory / formats.WEIGHTS_FILE).read_bytes(), base, AdapterLimits(),
                       AdapterKind.BOTTLENECK)
