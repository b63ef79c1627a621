"""The frozen base linears in the fastest form the device has: `BaseLinear`.

A base linear is y = x @ Wᵀ (+ b) with W in Hugging Face's [d_out, d_in] layout. It is stored once,
at load, as one of

  "plain"   W transposed, [d_in, d_out] contiguous, `x @ w` (CUDA, fp16, bf16 where the CPU has no
            native bf16, or no oneDNN)
  "onednn"  W (fp32, or bf16 on a CPU with AVX512-BF16/AMX) reordered once into oneDNN's blocked
            layout (`mkldnn._reorder_linear_weight`) and multiplied by `mkldnn._linear_pointwise`:
            what inductor's weight freezing emits on CPU. fp32: exact to fp32 rounding, 1.5-3x
            faster than MKL's sgemm at 8-1024 rows on 2 cores. bf16 (`--dtype bfloat16`): AMX
            tiles, ~3.5x the fp32 layer at 32 rows and ~5x at 512, bf16 in and out (as transformers
            runs bf16: fastest of oneDNN, `x @ w` and `F.linear` in bf16 at 1-1024 rows, measured)
  "bf16"    (`--quantize bf16`) the same bf16 oneDNN matmul under fp32 activations: x cast to bf16,
            y back to fp32 (fp32 accumulation). Only the weights and the matmul inputs round.
  "int8"    (`--quantize int8`, see `quantize.py`) `_Int8`: per-output-channel int8 W, per-token
            int8 activations, oneDNN's int8 matmul, the calibrated outlier input channels in fp32.

Not exact, off fp32 (SmolLM2, chat text, bench/dtype_drift.py; mean per-position logit error, share
of 32-token greedy outputs' tokens = fp32's; two runs): bf16 2.5-2.8% / 81-82%, bf16 weights
1.3-1.5% / 85-96%, int8 6.6% / 63-67% (it was 49% / 39% with fbgemm's per-tensor activations +
SmoothQuant; 11.6% -> 2.4% on the old random-token figure). Even weight-only per-channel int8 with fp32 activations measures 4.9% there,
so ~1% is out of reach of 8-bit per-channel weights on this model. The bench prints the speed.

Adapters never see the difference: the forward's hooks get x and y in the model's dtype. `dense()`
gives W back ([d_out, d_in], in the model's dtype; dequantized for int8) for code that needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

MODES = ("plain", "onednn", "bf16", "int8")
OUTLIER_CHANNELS = 16     # int8: input channels of largest calibrated range kept in fp32, per linear
PACK_ROWS = 1024          # row-count hint for the oneDNN reorder (a prefill step); any row count runs


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32, or bf16 where oneDNN runs bf16 natively (AVX512-BF16 / AMX), on a CPU build with oneDNN
    and its linear ops (inductor's freezing path)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_native()))
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@cache
def bf16_native() -> bool:
    """This CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), which oneDNN uses; oneDNN's
    bf16 on plain AVX512 is emulated and slower than fp32."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16")) and torch.backends.mkldnn.is_available()


def int8_available() -> bool:
    """oneDNN's int8 linear (x86 CPU builds of torch)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class BaseLinear:
    """One frozen base linear, [T, d_in] -> [T, d_out], in the weight's dtype. `small_rows` (fp32
    only) keeps a plain transposed copy as well and uses it for calls of at most that many rows (the
    LM head at batch 1, where one matrix-vector product through MKL beats oneDNN's fp32 blocked
    layout; in bf16 oneDNN is faster at every row count)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str | None = None,
                 small_rows: int = 0, act_max: torch.Tensor | None = None):
        # weight [d_out, d_in], bias [d_out]; act_max [d_in]: calibrated max |x_j| (int8 only)
        mode = mode or ("onednn" if onednn_available(weight.device, weight.dtype) else "plain")
        if mode not in MODES:
            raise ValueError(f"linear mode {mode!r} is not one of {MODES}")
        if mode == "onednn" and not onednn_available(weight.device, weight.dtype):
            mode = "plain"                                     # the fallback
        if mode == "int8" and not (int8_available() and weight.device.type == "cpu"):
            raise ValueError("int8 base weights need a CPU build of torch with oneDNN's int8 linear (x86)")
        if mode == "bf16" and not onednn_available(weight.device, torch.bfloat16):
            raise ValueError("bf16 base weights under fp32 activations need a CPU with AVX512-BF16 or AMX "
                             "(where oneDNN multiplies bf16 natively)")
        self.mode, self.d_out, self.d_in = mode, weight.shape[0], weight.shape[1]
        self.device, self.dtype = weight.device, weight.dtype
        self.bias = bias                                               # [d_out] or None
        self.small_rows = small_rows if self.dtype == torch.float32 else 0   # bf16: oneDNN wins at 1 row too
        self.w_t = weight.T.contiguous() if mode == "plain" or self.small_rows else None   # [d_in, d_out]
        self.packed = self.q = None
        if mode == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
        elif mode == "bf16":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), PACK_ROWS)
            self.dtype = torch.float32                                  # what the forward hands in and gets
            self.bias = None if bias is None else bias.float()
        elif mode == "int8":
            self.q = _Int8.make(weight.float(), act_max)
            self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] -> [T, d_out]."""
        if self.w_t is not None and (self.mode == "plain" or x.shape[0] <= self.small_rows):
            return x @ self.w_t if self.bias is None else torch.addmm(self.bias, x, self.w_t)
        if self.mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.mode == "bf16":
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
            return y if self.bias is None else y.add_(self.bias)
        return self.q(x, self.bias)

    def dense(self) -> torch.Tensor:
        """W [d_out, d_in] as served (DoRA's row norms are taken over it at adapter load): the plain
        copy, oneDNN's packed weight back in the dense layout (in fp32 for "bf16"), or int8
        dequantized to fp32 (its fp32 outlier columns put back)."""
        if self.w_t is not None:
            return self.w_t.T
        if self.mode in ("onednn", "bf16"):
            return self.packed.to_dense().to(self.dtype)
        return self.q.dense()

    def quantized(self, act_max: torch.Tensor | None = None) -> "BaseLinear":
        """The same linear with int8 weights (outlier channels from act_max [d_in] when given)."""
        return BaseLinear(self.dense(), self.bias, "int8", act_max=act_max)

    def bf16_weights(self) -> "BaseLinear":
        """The same fp32 linear with its weights and matmul in bf16 (fp32 in and out)."""
        return BaseLinear(self.dense(), self.bias, "bf16")

    def nbytes(self) -> int:
        """Bytes of weight read per call (what one step moves)."""
        per = {"int8": 1, "bf16": 2}.get(self.mode) or torch.empty(0, dtype=self.dtype).element_size()
        return self.d_out * self.d_in * per


@dataclass(frozen=True)
class _Int8:
    """An int8 linear: y = s_t * (q(x_t / s_t) @ Wq^T) * w_scale + x[:, outliers] @ W[:, outliers]^T.

    Per-output-channel symmetric int8 weights (w_scale [d_out]), per-token symmetric int8 activations
    (s_t = max_j |x_tj| / 127 over the channels kept in int8, computed every call), multiplied by
    oneDNN's int8 matmul (AMX-INT8 / VNNI; int32 accumulation, fp32 out). The OUTLIER_CHANNELS input
    channels of largest calibrated max |x_j| stay fp32 (LLM.int8()'s decomposition): their weight
    columns are zero in Wq and multiplied in fp32 beside it, so they neither stretch s_t nor lose bits."""
    packed: torch.Tensor          # oneDNN-prepacked int8 Wq [d_out, d_in], outlier columns zero
    w_scale: torch.Tensor         # [d_out] fp32
    w_zp: torch.Tensor            # [d_out] long, zeros (symmetric)
    keep: torch.Tensor | None     # [d_in] fp32, 0 on outlier channels, 1 elsewhere (None: no outliers)
    outliers: torch.Tensor        # [k] long, the fp32 input channels
    w_out_t: torch.Tensor         # [k, d_out] fp32, W[:, outliers]^T
    wq: torch.Tensor              # [d_out, d_in] int8, the same weights unpacked (dense())

    @staticmethod
    def make(w: torch.Tensor, act_max: torch.Tensor | None) -> "_Int8":
        """w [d_out, d_in] fp32; act_max [d_in] calibrated max |x_j| (None: no outlier channels)."""
        k = min(OUTLIER_CHANNELS, w.shape[1] // 8) if act_max is not None else 0
        outliers = act_max.float().topk(k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
        rest = w.contiguous().clone()                 # a plain copy (dense() may be a transposed view)
        rest[:, outliers] = 0
        w_scale = (rest.abs().amax(1) / 127).clamp(min=1e-12)                                   # [d_out]
        wq = (rest / w_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        keep = None
        if k:
            keep = torch.ones(w.shape[1])
            keep[outliers] = 0
        return _Int8(torch.ops.onednn.qlinear_prepack(wq, None), w_scale, torch.zeros(w.shape[0], dtype=torch.long),
                     keep, outliers, w[:, outliers].T.contiguous(), wq)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, d_in] fp32 -> [T, d_out] fp32."""
        xs = x if self.keep is None else x * self.keep
        s = xs.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)                         # [T, 1]
        xq = (xs / s).round_().to(torch.int8)                                  # |xs / s| <= 127
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, self.packed, self.w_scale, self.w_zp, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        y = y.mul_(s) if bias is None else torch.addcmul(bias, y, s)
        if self.keep is not None:
            y.addmm_(x.index_select(1, self.outliers), self.w_out_t)
        return y

    def dense(self) -> torch.Tensor:
        w = self.wq.float() * self.w_scale[:, None]
        w[:, self.outliers] = self.w_out_t.T
        return w
