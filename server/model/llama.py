"""The Llama-family forward (Llama, Mistral, Qwen2): RMSNorm, RoPE (default/linear/llama3
scaling), GQA, SwiGLU, tied or untied embeddings, over a slot-indexed KV cache.

The forward takes the step's batch description (`ForwardBatch`) and the adapter hooks as
arguments; nothing about a step is stored on the model. Tokens of many sequences are
flattened into one `[num_tokens, dim]` matrix so every linear runs once per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from server.model.quantize import BaseLinear


SMALL_ROWS = 4       # LM-head calls of at most this many rows use a plain transposed copy (batch 1)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class ForwardBatch:
    """One engine step: the tokens of every scheduled sequence, flattened.

    A *segment* is a run of consecutive tokens of one sequence. Segments of one token
    (decode steps) attend in one batched call; longer ones (prefill chunks) in another,
    padded to the longest chunk. All index tensors are built once per step.
    """
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long, position of each token in its sequence
    token_slots: torch.Tensor        # [T] long, KV slot of each token's sequence
    logit_rows: torch.Tensor         # [R] long, token rows whose logits the caller wants
    decode_rows: torch.Tensor        # [B] long, token rows of one-token segments
    decode_slots: torch.Tensor       # [B] long, their KV slots
    decode_mask: torch.Tensor        # [B, 1, 1, Ld] bool, key j visible to decode row b
    decode_slot_range: tuple[int, int] | None  # (first, count) when decode_slots are consecutive
    decode_only: bool                # every token is a decode row, rows 0..T-1 in order
    prefill_rows: torch.Tensor       # [P, Lq] long, token row of each chunk query (pads repeat a row)
    prefill_valid: torch.Tensor      # [P, Lq] bool, False on padding
    prefill_slots: torch.Tensor      # [P] long
    prefill_mask: torch.Tensor       # [P, 1, Lq, Lk] bool, causal over the slot's cache


class AdapterHooks(Protocol):
    """Where adapters enter the forward. Targets: "qkv", "o", "gate_up", "down"."""

    def embed(self, h: torch.Tensor) -> torch.Tensor: ...                  # [T, dim] -> [T, dim]
    def pre_linear(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor: ...
    def post_linear(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def block_out(self, layer: int, place: str, h: torch.Tensor) -> torch.Tensor: ...  # "attn" | "mlp"


@dataclass
class LayerWeights:
    """Linears are `BaseLinear`s (server/model/quantize.py): prepacked once at load for the
    device's fastest matmul (oneDNN on CPU, exact), or int8 with `--quantize int8`."""
    wqkv: BaseLinear                 # [dim] -> [q_size + 2 * kv_size] (+ bias for Qwen2)
    wo: BaseLinear                   # [q_size] -> [dim]
    w_gate_up: BaseLinear            # [dim] -> [2 * intermediate]
    w_down: BaseLinear               # [intermediate] -> [dim]
    attn_norm: torch.Tensor          # [dim]
    mlp_norm: torch.Tensor           # [dim]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] with the config's rope scaling applied."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if args.rope_type == "default":
        return inv
    if args.rope_type == "linear":
        return inv / s["factor"]
    if args.rope_type == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {args.rope_type!r} is not supported (default, linear, llama3)")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, dim] normalised in float32 (as HF's LlamaRMSNorm), cast back, times w [dim]."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)        # one fused op
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, 1, head_dim]; HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class LlamaModel:
    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor):
        self.args = args
        self.embed_tokens = embed    # [vocab, dim]
        self.layers = layers
        self.norm = norm             # [dim]
        self.lm_head = BaseLinear(lm_head, small_rows=SMALL_ROWS)   # [dim] -> [vocab] (packed copy when tied)
        self.device, self.dtype = embed.device, embed.dtype
        self._inv_freq = rope_inv_freq(args)
        self._cos = self._sin = torch.empty(0, args.head_dim, device=self.device)

    @classmethod
    def from_hf_weights(cls, args: ModelArgs, w: dict[str, torch.Tensor], device: torch.device,
                        dtype: torch.dtype) -> "LlamaModel":
        rope_inv_freq(args)  # refuse unsupported rope scaling at load time

        def t(name: str) -> torch.Tensor:
            return w[name].to(device=device, dtype=dtype).contiguous()

        def lin(*names: str, bias: torch.Tensor | None = None) -> BaseLinear:   # HF [d_out, d_in] pieces
            return BaseLinear(torch.cat([t(n) for n in names]), bias)

        layers = []
        for i in range(args.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = None
            if args.qkv_bias:
                bias = torch.cat([t(a + "q_proj.bias"), t(a + "k_proj.bias"), t(a + "v_proj.bias")])
            layers.append(LayerWeights(
                wqkv=lin(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight", bias=bias),
                wo=lin(a + "o_proj.weight"),
                w_gate_up=lin(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                w_down=lin(p + "mlp.down_proj.weight"),
                attn_norm=t(p + "input_layernorm.weight"),
                mlp_norm=t(p + "post_attention_layernorm.weight"),
            ))
        embed = t("model.embed_tokens.weight")
        head = embed if args.tie_embeddings or "lm_head.weight" not in w else t("lm_head.weight")
        return cls(args, embed, layers, t("model.norm.weight"), head)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] for positions [T]; the table grows on demand."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float64), self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = emb.cos().to(self.device, self.dtype)
            self._sin = emb.sin().to(self.device, self.dtype)
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: list[tuple[torch.Tensor, torch.Tensor]],
                hooks: AdapterHooks | None = None, input_embeds: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Run one step. kv[layer] = (k, v), each [slots, n_kv_heads, max_len, head_dim].

        Returns logits [R, vocab] for `batch.logit_rows` (or the final hidden states
        [R, dim] when `return_hidden`). `input_embeds` [T, dim] replaces the embedding lookup.
        """
        a = self.args
        h = self.embed_tokens[batch.input_ids] if input_embeds is None else input_embeds  # [T, dim]
        if hooks is not None:
            h = hooks.embed(h)
        cos, sin = self.rope(batch.positions)
        decode_bias = torch.zeros(batch.decode_mask.shape, dtype=torch.float32,
                                  device=h.device).masked_fill_(~batch.decode_mask, float("-inf"))
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.attn_norm, a.norm_eps)
            qkv = _linear(x, lw.wqkv, hooks, i, "qkv")                        # [T, q + 2 kv]
            qk = qkv[:, :a.q_size + a.kv_size].view(-1, a.n_heads + a.n_kv_heads, a.head_dim)
            qk = apply_rope(qk, cos, sin)                                   # [T, H + Hkv, hd], one pass
            q, k = qk[:, :a.n_heads], qk[:, a.n_heads:]                     # [T, H, hd], [T, Hkv, hd]
            v = qkv[:, a.q_size + a.kv_size:]
            kc, vc = kv[i]
            kc[batch.token_slots, :, batch.positions] = k
            vc[batch.token_slots, :, batch.positions] = v.view(-1, a.n_kv_heads, a.head_dim)
            attn = self._attention(q, kc, vc, batch, decode_bias)         # [T, H * hd]
            o = _linear(attn, lw.wo, hooks, i, "o")
            if hooks is not None:
                o = hooks.block_out(i, "attn", o)
            h = h + o
            x = rms_norm(h, lw.mlp_norm, a.norm_eps)
            gate, up = _linear(x, lw.w_gate_up, hooks, i, "gate_up").chunk(2, dim=-1)
            m = _linear(F.silu(gate) * up, lw.w_down, hooks, i, "down")
            if hooks is not None:
                m = hooks.block_out(i, "mlp", m)
            h = h + m
        h = rms_norm(h[batch.logit_rows], self.norm, a.norm_eps)          # [R, dim]
        return h if return_hidden else self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [R, dim] -> logits [R, vocab]."""
        return self.lm_head(h)

    def _attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                   batch: ForwardBatch, decode_bias: torch.Tensor) -> torch.Tensor:
        """q [T, H, hd] -> [T, H * hd]; every token attends to its slot's cache up to itself.
        kc, vc: [slots, kv_heads, max_len, hd]."""
        T, H, hd = q.shape
        out = torch.empty_like(q)
        gqa = self.args.n_heads != self.args.n_kv_heads
        if batch.decode_rows.numel():
            n = batch.decode_mask.shape[-1]
            if batch.decode_slot_range is not None:         # a view, no copy
                first, count = batch.decode_slot_range
                ks, vs = kc[first:first + count, :, :n], vc[first:first + count, :, :n]
            else:
                ks, vs = kc[batch.decode_slots, :, :n], vc[batch.decode_slots, :, :n]  # [B, Hkv, n, hd]
            qd = q if batch.decode_only else q[batch.decode_rows]           # [B, H, hd]
            od = _decode_attention(qd, ks, vs, decode_bias)                 # [B, H * hd]
            if batch.decode_only:                                          # rows are 0..T-1 in order
                return od
            out[batch.decode_rows] = od.view(-1, H, hd)
        if batch.prefill_rows.numel():
            n = batch.prefill_mask.shape[-1]
            ks, vs = kc[batch.prefill_slots, :, :n], vc[batch.prefill_slots, :, :n]   # [P, Hkv, n, hd]
            qp = q[batch.prefill_rows].transpose(1, 2)                      # [P, H, Lq, hd]
            op = F.scaled_dot_product_attention(qp, ks, vs, attn_mask=batch.prefill_mask, enable_gqa=gqa)
            valid = batch.prefill_valid
            out[batch.prefill_rows[valid]] = op.transpose(1, 2)[valid]
        return out.reshape(T, H * hd)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One query per row: q [B, H, hd], k/v [B, Hkv, n, hd], bias [B, 1, 1, n] (0 or -inf)
    -> [B, H * hd]. Query heads h*G..h*G+G-1 share kv head h (HF's repeat_kv order). Two small
    batched matmuls beat SDPA's kernel at these shapes on CPU; softmax in float32."""
    B, H, hd = q.shape
    Hkv = k.shape[1]
    s = torch.matmul(q.view(B, Hkv, H // Hkv, hd), k.transpose(-1, -2)).float()   # [B, Hkv, G, n]
    p = (s * hd ** -0.5 + bias).softmax(-1).to(v.dtype)
    return torch.matmul(p, v).reshape(B, H * hd)


def _linear(x: torch.Tensor, w: BaseLinear, hooks: AdapterHooks | None, layer: int,
            target: str) -> torch.Tensor:
    """Base linear plus the step's adapter deltas on it. x [T, d_in] -> [T, d_out]."""
    if hooks is None:
        return w(x)
    x = hooks.pre_linear(layer, target, x)
    return hooks.post_linear(layer, target, x, w(x))
