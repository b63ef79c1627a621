"""The frozen base model's shape, read once from its Hugging Face config.json, and the one table of
its linear layers. Torch-free.

`BaseModelShape` is what the forward runs with (`LlamaModel.shape`), what the KV cache and the
adapter slots are sized by, and what adapters must fit (validation). Names are Hugging Face's.

`LINEARS` names the seven linears of a Llama block once: each module's parent in the Hugging Face
model (`self_attn` | `mlp`), the fused linear of our forward that computes it (`qkv`, `o`, `gate_up`,
`down`: q/k/v and gate/up run as one matmul), its position in that target's output, and the
`LayerWeights` field holding the target. Every other table (PEFT paths, adapter slot layout,
quantization, the trainer's choices) is derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.errors import InvalidArgument


@dataclass(frozen=True)
class LinearModule:
    """One Llama linear layer and where it sits in our fused forward."""

    name: str      # Hugging Face module name, e.g. "k_proj"
    parent: str    # "self_attn" | "mlp": model.layers.{i}.{parent}.{name}
    target: str    # the forward's fused linear: "qkv" | "o" | "gate_up" | "down"
    part: int      # position of this module's output columns within the target's output


LINEARS = (
    LinearModule("q_proj", "self_attn", "qkv", 0),
    LinearModule("k_proj", "self_attn", "qkv", 1),
    LinearModule("v_proj", "self_attn", "qkv", 2),
    LinearModule("o_proj", "self_attn", "o", 0),
    LinearModule("gate_proj", "mlp", "gate_up", 0),
    LinearModule("up_proj", "mlp", "gate_up", 1),
    LinearModule("down_proj", "mlp", "down", 0),
)
LINEAR_MODULES = tuple(m.name for m in LINEARS)
MLP_MODULES = tuple(m.name for m in LINEARS if m.parent == "mlp")
MODULES = {m.name: m for m in LINEARS}
MODULE_PARENT = {m.name: m.parent for m in LINEARS}
TARGET_WEIGHT = {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up", "down": "w_down"}  # LayerWeights fields
TARGETS = tuple(TARGET_WEIGHT)
TARGET_MODULES = {t: tuple(m.name for m in LINEARS if m.target == t) for t in TARGETS}  # in part order
UNFUSED = {m.name: m.target for m in LINEARS if len(TARGET_MODULES[m.target]) == 1}
"""Modules that are a target alone (o_proj, down_proj): only their input is theirs alone."""


def module_path(layer: int, module: str) -> str:
    """The module's name inside the Hugging Face model (as PEFT matches rank_pattern keys)."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions and layout of the frozen base model (Llama, Mistral, Qwen2)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = field(default=())   # (key, value) pairs beyond the type
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_hf_config(cfg: dict) -> "BaseModelShape":
        """From a Hugging Face Llama-family config.json dict (KeyError names a missing field)."""
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        return BaseModelShape(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type"))),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )

    def target_dims(self, target: str) -> tuple[int, tuple[int, ...]]:
        """(d_in, (d_out of each part)) of one fused target of the forward."""
        return self.linear_dims(TARGET_MODULES[target][0])[0], \
            tuple(self.linear_dims(m)[1] for m in TARGET_MODULES[target])

    def linear_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of one of the seven Llama linears; InvalidArgument for any other name."""
        q, kv = self.q_size, self.kv_size
        dims = {"q_proj": (self.hidden_size, q), "k_proj": (self.hidden_size, kv),
                "v_proj": (self.hidden_size, kv), "o_proj": (q, self.hidden_size),
                "gate_proj": (self.hidden_size, self.intermediate_size),
                "up_proj": (self.hidden_size, self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size)}
        if module not in dims:
            raise InvalidArgument(f"unknown module {module!r}; known: {', '.join(LINEAR_MODULES)}")
        return dims[module]
