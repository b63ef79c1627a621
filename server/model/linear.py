"""The frozen base linears in the fastest form the device has: `BaseLinear`.

A base linear is y = x @ Wᵀ (+ b) with W in Hugging Face's [d_out, d_in] layout. It is stored once,
at load, as one of

  "plain"   W transposed, [d_in, d_out] contiguous, `x @ w` (CUDA, non-fp32 dtypes, or no oneDNN)
  "onednn"  fp32 W reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`)
            and multiplied by `mkldnn._linear_pointwise`: what inductor's weight freezing emits on
            CPU, exact to fp32 rounding, 1.5-3x faster than MKL's sgemm at 8-1024 rows on 2 cores
  "int8"    (opt-in, `--quantize int8`, see `quantize.py`) per-output-channel symmetric int8 W,
            fbgemm's dynamic linear (activations quantized per call, accumulated in int32, output
            fp32). Not exact: the bench reports its drift. Activations of real models have outlier
            channels that one per-tensor activation scale cannot hold (SmolLM2: logits off by
            30-100% without this), so each input channel j is first divided by
            s_j = max|x_j|^a / max|W_:,j|^(1-a) and W's column multiplied by it (SmoothQuant,
            a = SMOOTH_ALPHA), with max|x_j| from a calibration pass (`quantize.calibrate`).

Adapters never see the difference: the forward's hooks get fp32 x and y either way. `dense()` gives
W back ([d_out, d_in], fp32; dequantized for int8) for code that needs the weight itself.
"""
from __future__ import annotations

import warnings

import torch

MODES = ("plain", "onednn", "int8")
SMOOTH_ALPHA = 0.8        # int8: share of an input channel's range moved into the weights
PACK_ROWS = 1024          # row-count hint for the oneDNN reorder (a prefill step); any row count runs


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32 on a CPU build with oneDNN and its linear ops (inductor's freezing path)."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or \
        "x86" in torch.backends.quantized.supported_engines


class BaseLinear:
    """One frozen base linear, [T, d_in] -> [T, d_out]. `small_rows` keeps a plain transposed copy
    as well and uses it for calls of at most that many rows (the LM head at batch 1, where one
    matrix-vector product through MKL beats oneDNN's blocked layout)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str | None = None,
                 small_rows: int = 0, act_max: torch.Tensor | None = None):
        # weight [d_out, d_in], bias [d_out]; act_max [d_in]: calibrated max |x_j| (int8 only)
        mode = mode or ("onednn" if onednn_available(weight.device, weight.dtype) else "plain")
        if mode not in MODES:
            raise ValueError(f"linear mode {mode!r} is not one of {MODES}")
        if mode == "onednn" and not onednn_available(weight.device, weight.dtype):
            mode = "plain"                                     # the fallback
        if mode == "int8" and not (int8_available() and weight.device.type == "cpu"):
            raise ValueError("int8 base weights need a CPU build of torch with fbgemm (x86)")
        self.mode, self.d_out, self.d_in = mode, weight.shape[0], weight.shape[1]
        self.device, self.dtype = weight.device, weight.dtype
        self.bias = bias                                               # [d_out] or None
        self.small_rows = small_rows
        self.w_t = weight.T.contiguous() if mode == "plain" or small_rows else None   # [d_in, d_out]
        self.packed = self.inv_smooth = None
        if mode == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
        elif mode == "int8":
            w = weight.float()
            if act_max is not None:
                smooth = (act_max.float().clamp(min=1e-5) ** SMOOTH_ALPHA
                          / w.abs().amax(0).clamp(min=1e-5) ** (1 - SMOOTH_ALPHA))           # [d_in]
                self.inv_smooth = 1.0 / smooth
                w = w * smooth
            self.packed = _int8_prepack(w, None if bias is None else bias.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] -> [T, d_out]."""
        if self.w_t is not None and (self.mode == "plain" or x.shape[0] <= self.small_rows):
            return x @ self.w_t if self.bias is None else torch.addmm(self.bias, x, self.w_t)
        if self.mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, False)   # int8

    def dense(self) -> torch.Tensor:
        """W [d_out, d_in] as served (DoRA's row norms are taken over it at adapter load): the plain
        copy, oneDNN's packed weight back in the dense layout, or int8 dequantized to fp32 with the
        smoothing undone."""
        if self.w_t is not None:
            return self.w_t.T
        if self.mode == "onednn":
            return self.packed.to_dense()
        w, _ = torch.ops.quantized.linear_unpack(self.packed)
        w = w.dequantize()
        return w if self.inv_smooth is None else w * self.inv_smooth

    def quantized(self, act_max: torch.Tensor | None = None) -> "BaseLinear":
        """The same linear with int8 weights (smoothed by act_max [d_in] when given)."""
        return BaseLinear(self.dense(), self.bias, "int8", act_max=act_max)

    def nbytes(self) -> int:
        """Bytes of weight read per call (what one step moves)."""
        per = 1 if self.mode == "int8" else (self.w_t.element_size() if self.w_t is not None else 4)
        return self.d_out * self.d_in * per


def _int8_prepack(w: torch.Tensor, b: torch.Tensor | None):
    """Per-output-channel symmetric int8 of w [d_out, d_in], prepacked for fbgemm's dynamic linear."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():        # the quantized-tensor API warns that it is deprecated
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, b)
