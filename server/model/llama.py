"""The Llama-family forward (Llama, Mistral, Qwen2): RMSNorm, RoPE (default/linear/llama3
scaling), GQA, SwiGLU, tied or untied embeddings, over a paged KV cache (block tables).

The forward takes the step's batch description (`ForwardBatch`) and the adapter hooks as
arguments; nothing about a step is stored on the model. Tokens of many sequences are
flattened into one `[num_tokens, hidden]` matrix so every linear runs once per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from server.model.linear import BaseLinear
from server.model.shape import TARGET_MODULES, TARGET_WEIGHT, TARGETS, BaseModelShape, module_path


SMALL_ROWS = 4       # LM-head calls of at most this many rows use a plain transposed copy (batch 1)


@dataclass(frozen=True)
class ForwardBatch:
    """One engine step: the tokens of every scheduled sequence, flattened, and where their K/V live.

    A *segment* is a run of consecutive tokens of one sequence. Segments of one token
    (decode steps) attend in one batched call; longer ones (prefill chunks) in another,
    padded to the longest chunk. The KV cache is paged (server/engine/kv_cache.py): each row reads
    its sequence's blocks through its block table, padded with the null block (0, zeros, masked).
    All index tensors are built once per step.
    """
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long, position of each token in its sequence
    slot_mapping: torch.Tensor       # [T] long, block * block_size + offset where each token's K/V go
    logit_rows: torch.Tensor         # [R] long, token rows whose logits the caller wants
    decode_rows: torch.Tensor        # [B] long, token rows of one-token segments
    decode_blocks: torch.Tensor      # [B, Nd] long, their block tables (null-padded)
    decode_mask: torch.Tensor        # [B, Nd * bs] bool, key j visible to decode row b
    decode_views: tuple[tuple[int, int, int, int], ...] | None   # (first row, rows, first block,
    #                                  stride): row r0 + b's table is blocks first + b * stride + [0, Nd),
    #                                  each group read as one strided view of the pool (no gather)
    decode_only: bool                # every token is a decode row, rows 0..T-1 in order
    prefill_rows: torch.Tensor       # [P, Lq] long, token row of each chunk query (pads repeat a row)
    prefill_valid: torch.Tensor      # [P, Lq] bool, False on padding
    prefill_blocks: torch.Tensor     # [P, Np] long, block tables of the chunks' sequences (null-padded)
    prefill_mask: torch.Tensor       # [P, 1, Lq, Np * bs] bool, causal over the sequence's blocks


class AdapterHooks(Protocol):
    """Where adapters enter the forward. Targets: shape.TARGETS ("qkv", "o", "gate_up", "down")."""

    def embed(self, h: torch.Tensor) -> torch.Tensor: ...                  # [T, hidden] -> [T, hidden]
    def pre_linear(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor: ...
    def post_linear(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def block_out(self, layer: int, place: str, h: torch.Tensor) -> torch.Tensor: ...  # "attn" | "mlp"


@dataclass
class LayerWeights:
    """Linears are `BaseLinear`s (server/model/linear.py): prepacked once at load for the
    device's fastest matmul (oneDNN on CPU, exact), or int8 with `--quantize int8`. One field per
    fused target (shape.TARGET_WEIGHT)."""
    wqkv: BaseLinear                 # [hidden] -> [q_size + 2 * kv_size] (+ bias for Qwen2)
    wo: BaseLinear                   # [q_size] -> [hidden]
    w_gate_up: BaseLinear            # [hidden] -> [2 * intermediate]
    w_down: BaseLinear               # [intermediate] -> [hidden]
    attn_norm: torch.Tensor          # [hidden]
    mlp_norm: torch.Tensor           # [hidden]


def rope_inv_freq(shape: BaseModelShape) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] with the config's rope scaling applied."""
    hd = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = dict(shape.rope_scaling)
    if shape.rope_type == "default":
        return inv
    if shape.rope_type == "linear":
        return inv / s["factor"]
    if shape.rope_type == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {shape.rope_type!r} is not supported (default, linear, llama3)")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] normalised in float32 (as HF's LlamaRMSNorm), cast back, times w [hidden]."""
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
    def __init__(self, shape: BaseModelShape, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor):
        self.shape = shape
        self.embed_tokens = embed    # [vocab, hidden]
        self.layers = layers
        self.norm = norm             # [hidden]
        self.lm_head = BaseLinear(lm_head, small_rows=SMALL_ROWS)   # [hidden] -> [vocab] (packed copy when tied)
        self.device, self.dtype = embed.device, embed.dtype
        self._inv_freq = rope_inv_freq(shape)
        self._cos = self._sin = torch.empty(0, shape.head_dim, device=self.device)

    @classmethod
    def from_hf_weights(cls, shape: BaseModelShape, w: dict[str, torch.Tensor], device: torch.device,
                        dtype: torch.dtype) -> "LlamaModel":
        rope_inv_freq(shape)  # refuse unsupported rope scaling at load time

        def t(name: str) -> torch.Tensor:      # a copy of our own: never a view of the mmapped file
            x = w[name].to(device=device, dtype=dtype).contiguous()
            return x.clone() if x.data_ptr() == w[name].data_ptr() else x

        def lin(layer: int, target: str) -> BaseLinear:   # the target's HF [d_out, d_in] pieces, stacked
            paths = [module_path(layer, m) for m in TARGET_MODULES[target]]
            bias = None
            if shape.qkv_bias and target == "qkv":
                bias = torch.cat([t(f"{p}.bias") for p in paths])
            return BaseLinear(torch.cat([t(f"{p}.weight") for p in paths]), bias)

        layers = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            layers.append(LayerWeights(
                **{TARGET_WEIGHT[target]: lin(i, target) for target in TARGETS},
                attn_norm=t(p + "input_layernorm.weight"),
                mlp_norm=t(p + "post_attention_layernorm.weight"),
            ))
        embed = t("model.embed_tokens.weight")
        head = embed if shape.tie_embeddings or "lm_head.weight" not in w else t("lm_head.weight")
        return cls(shape, embed, layers, t("model.norm.weight"), head)

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
        """Run one step. kv[layer] = (k, v), each [num_kv_heads, num_blocks, block_size, head_dim].

        Returns logits [R, vocab] for `batch.logit_rows` (or the final hidden states
        [R, hidden] when `return_hidden`). `input_embeds` [T, hidden] replaces the embedding lookup.
        """
        a = self.shape
        h = self.embed_tokens[batch.input_ids] if input_embeds is None else input_embeds  # [T, hidden]
        if hooks is not None:
            h = hooks.embed(h)
        cos, sin = self.rope(batch.positions)
        B, n = batch.decode_mask.shape
        decode_bias = torch.zeros(batch.decode_mask.shape, dtype=h.dtype,               # [1, B, 1, Nd * bs]
                                  device=h.device).masked_fill_(~batch.decode_mask, float("-inf")).view(1, B, 1, n)
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.attn_norm, a.norm_eps)
            qkv = _linear(x, lw.wqkv, hooks, i, "qkv")                        # [T, q + 2 kv]
            qk = qkv[:, :a.q_size + a.kv_size].view(-1, a.num_heads + a.num_kv_heads, a.head_dim)
            qk = apply_rope(qk, cos, sin)                                   # [T, H + Hkv, hd], one pass
            q, k = qk[:, :a.num_heads], qk[:, a.num_heads:]                 # [T, H, hd], [T, Hkv, hd]
            v = qkv[:, a.q_size + a.kv_size:]
            kc, vc = kv[i]
            kc.view(a.num_kv_heads, -1, a.head_dim).index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
            vc.view(a.num_kv_heads, -1, a.head_dim).index_copy_(
                1, batch.slot_mapping, v.view(-1, a.num_kv_heads, a.head_dim).transpose(0, 1))
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
        h = rms_norm(h[batch.logit_rows], self.norm, a.norm_eps)          # [R, hidden]
        return h if return_hidden else self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [R, hidden] -> logits [R, vocab]."""
        return self.lm_head(h)

    def _attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                   batch: ForwardBatch, decode_bias: torch.Tensor) -> torch.Tensor:
        """q [T, H, hd] -> [T, H * hd]; every token attends to its sequence's blocks up to itself.
        kc, vc: [kv_heads, num_blocks, block_size, hd]. Each group's blocks are gathered once along
        the block dim (one copy), which is at once the matmuls' [kv_heads, rows, keys, hd] operand."""
        T, H, hd = q.shape
        Hkv = kc.shape[0]
        out = torch.empty_like(q)
        gqa = self.shape.num_heads != self.shape.num_kv_heads
        if batch.decode_rows.numel():
            B, nd = batch.decode_blocks.shape
            qd = q if batch.decode_only else q[batch.decode_rows]           # [B, H, hd]
            if batch.decode_views is not None:                              # in place, no copy
                parts = [_decode_attention(qd[r0:r0 + n], _block_view(kc, first, stride, n, nd),
                                           _block_view(vc, first, stride, n, nd), decode_bias[:, r0:r0 + n])
                         for r0, n, first, stride in batch.decode_views]
                od = parts[0] if len(parts) == 1 else torch.cat(parts)       # [B, H * hd]
            else:
                ids = batch.decode_blocks.view(-1)
                ks = kc.index_select(1, ids).view(Hkv, B, -1, hd)            # [Hkv, B, Nd * bs, hd]
                vs = vc.index_select(1, ids).view(Hkv, B, -1, hd)
                od = _decode_attention(qd, ks, vs, decode_bias)             # [B, H * hd]
            if batch.decode_only:                                          # rows are 0..T-1 in order
                return od
            out[batch.decode_rows] = od.view(-1, H, hd)
        if batch.prefill_rows.numel():
            P = batch.prefill_blocks.shape[0]
            ids = batch.prefill_blocks.view(-1)
            ks = kc.index_select(1, ids).view(Hkv, P, -1, hd).transpose(0, 1)   # [P, Hkv, Np * bs, hd]
            vs = vc.index_select(1, ids).view(Hkv, P, -1, hd).transpose(0, 1)
            qp = q[batch.prefill_rows].transpose(1, 2)                      # [P, H, Lq, hd]
            op = F.scaled_dot_product_attention(qp, ks, vs, attn_mask=batch.prefill_mask, enable_gqa=gqa)
            valid = batch.prefill_valid
            out[batch.prefill_rows[valid]] = op.transpose(1, 2)[valid]
        return out.reshape(T, H * hd)


def _block_view(c: torch.Tensor, first: int, stride: int, rows: int, width: int) -> torch.Tensor:
    """[Hkv, rows, width * bs, hd] view of a contiguous pool c [Hkv, N, bs, hd] whose row b is
    blocks first + b * stride + [0, width)."""
    hkv, _, bs, hd = c.shape
    s_head, s_block, s_pos, s_dim = c.stride()
    assert s_block == bs * s_pos, "the pool's blocks must be contiguous"
    return c.as_strided((hkv, rows, width * bs, hd), (s_head, stride * s_block, s_pos, s_dim),
                        c.storage_offset() + first * s_block)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One query per row: q [B, H, hd], k/v [Hkv, B, n, hd] (head-major, as gathered from the
    blocks), bias [1, B, 1, n] (0 or -inf) -> [B, H * hd]. Query heads h*G..h*G+G-1 share kv head h
    (HF's repeat_kv order), so they are one SDPA call's G query positions over kv head h's keys:
    batch (Hkv, B), no K/V copy for GQA. Measured faster than two batched matmuls on CPU (2.4x at
    one row of 6,000 keys, 1.1-1.4x at 8-32 rows of 64-464 keys)."""
    B, H, hd = q.shape
    Hkv = k.shape[0]
    qh = q.view(B, Hkv, H // Hkv, hd).transpose(0, 1)                              # [Hkv, B, G, hd]
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=bias)                    # [Hkv, B, G, hd]
    return o.transpose(0, 1).reshape(B, H * hd)


def _linear(x: torch.Tensor, w: BaseLinear, hooks: AdapterHooks | None, layer: int,
            target: str) -> torch.Tensor:
    """Base linear plus the step's adapter deltas on it. x [T, d_in] -> [T, d_out]."""
    if hooks is None:
        return w(x)
    x = hooks.pre_linear(layer, target, x)
    return hooks.post_linear(layer, target, x, w(x))
