"""The frozen base model's shape, read from its Hugging Face config.json once: what adapters must
fit (validation, slots) and what the forward's `ModelArgs` is built from. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from server.errors import InvalidArgument

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions of the frozen base model (adapters must fit them)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @staticmethod
    def from_hf_config(cfg: dict) -> "BaseModelShape":
        """From a Hugging Face Llama-family config.json dict."""
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return BaseModelShape(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
        )

    def linear_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of one of the seven Llama linears; InvalidArgument for any other name."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        dims = {"q_proj": (self.hidden_size, q), "k_proj": (self.hidden_size, kv),
                "v_proj": (self.hidden_size, kv), "o_proj": (q, self.hidden_size),
                "gate_proj": (self.hidden_size, self.intermediate_size),
                "up_proj": (self.hidden_size, self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size)}
        if module not in dims:
            raise InvalidArgument(f"unknown module {module!r}; known: {', '.join(LINEAR_MODULES)}")
        return dims[module]
