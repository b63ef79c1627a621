"""The adapter value types: one in-memory description (`AdapterWeights`) of an adapter of any kind,
and the typed parts it holds. Every parser (formats, peft_variants, validate) builds or checks
these; the cache, the device slots and the trainer read them. Tensors are float32 on CPU.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch


class AdapterKind(enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"
    PREFIX_TUNING = "PREFIX_TUNING"
    PROMPT_TUNING = "PROMPT_TUNING"
    DORA = "DORA"  # a PEFT LORA file with use_dora: true
    ADALORA = "ADALORA"
    VERA = "VERA"


LORA_FAMILY = frozenset({AdapterKind.LORA, AdapterKind.DORA, AdapterKind.ADALORA, AdapterKind.VERA})
"""Kinds served as LoRA factors in the LoRA slots (AdaLoRA and VeRA folded at load)."""


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """delta(x) = scale * (B @ A @ x + bias); DoRA then scales the whole output column-wise by
    magnitude / ||W + scale * B @ A||_row (computed once per slot, see peft_variants.dora_scale)."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float  # alpha / r (or alpha / sqrt(r) with use_rslora), patterns applied
    bias: torch.Tensor | None = None  # [d_out] LoRA bias (lora_B.bias), inside the scaled term
    magnitude: torch.Tensor | None = None  # [d_out] DoRA magnitude m (lora_magnitude_vector)


@dataclass(frozen=True, eq=False)
class Ia3Target:
    vec: torch.Tensor  # [d_in] if on_input else [d_out]
    on_input: bool  # True: scales the module's input (feedforward); False: its output


@dataclass(frozen=True, eq=False)
class BottleneckTarget:
    down: torch.Tensor  # [r, hidden]
    down_bias: torch.Tensor | None  # [r]
    up: torch.Tensor  # [hidden, r]
    up_bias: torch.Tensor | None  # [hidden]
    activation: str  # relu | gelu | silu


@dataclass(frozen=True, eq=False)
class ClassificationHead:
    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor | None  # [num_labels]
    labels: tuple[str, ...]  # len == num_labels


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """One adapter, any kind, float32 on CPU. Only the fields of its kind are non-empty."""

    kind: AdapterKind
    lora: dict[tuple[int, str], LoraTarget]  # (layer, module) -> target
    ia3: dict[tuple[int, str], Ia3Target]  # (layer, module) -> target
    bottleneck: dict[tuple[int, str], BottleneckTarget]  # (layer, "attn"|"mlp") -> target
    prefix_kv: torch.Tensor | None  # [num_layers, 2, num_kv_heads, n_virtual, head_dim]
    prompt_embeds: torch.Tensor | None  # [n_virtual, hidden]
    head: ClassificationHead | None
    rank: int  # max LoRA r (folded: AdaLoRA's kept rank, VeRA's r) or bottleneck size; 0 otherwise
    nbytes: int  # bytes of all tensors held (float32)
    config: dict  # the parsed adapter_config.json

    @property
    def lora_bias(self) -> bool:
        """True for a LoRA with `lora_bias` (a bias inside the scaled term of some target)."""
        return any(t.bias is not None for t in self.lora.values())


class TensorRole(NamedTuple):
    """Where a tensor name points: role in lora|ia3|bottleneck|prompt|head|vera (VeRA's shared pair)."""

    role: str
    layer: int  # -1 when not per layer
    module: str  # linear module, "attn"/"mlp" for bottleneck, "" otherwise
    part: str  # lora: A, B, B.bias, magnitude (DoRA), E (AdaLoRA), lambda_b/lambda_d (VeRA);
    #            vera: A/B; bottleneck: down.weight etc.; head: weight/bias; "" otherwise
