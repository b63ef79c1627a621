"""BaseLinear (prepacked oneDNN, plain fallback, opt-in bf16 weights and int8) against float64
F.linear, and `quantize_model` on the tiny model (bf16 bounds: tests/unit/test_dtypes.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import KVCache
from server.model.loader import load_model
from server.model.linear import BaseLinear, onednn_available
from server.model.quantize import quantize_model

CPU = torch.device("cpu")


def ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["onednn", "plain"])
@pytest.mark.parametrize("rows", [0, 1, 3, 8, 33, 1030])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_linear_is_exact_to_fp32_rounding(mode, rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g) * 0.1          # [d_out, d_in]
    b = torch.randn(200, generator=g) if bias else None
    lin = BaseLinear(w, b, mode)
    assert lin.mode == (mode if onednn_available(CPU, torch.float32) else "plain")
    x = torch.randn(rows, 96, generator=g)
    with torch.inference_mode():
        y = lin(x)
        y_t = lin(torch.randn(96, rows, generator=g).T)      # a non-contiguous input
    assert y.shape == (rows, 200) and y.dtype == torch.float32 and y_t.shape == (rows, 200)
    if rows:
        assert (y.double() - ref(x, w, b)).abs().max() < 1e-5
    assert torch.equal(lin.dense(), w)


def test_small_rows_copy_matches_packed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g)
    lin = BaseLinear(w, small_rows=4)
    x = torch.randn(4, 64, generator=g)
    packed = BaseLinear(w)
    assert (lin(x) - packed(x)).abs().max() < 1e-5          # the plain copy answers 4 rows
    assert (lin(x[:3]) - ref(x[:3], w, None)).abs().max() < 1e-5


def test_fallback_off_fp32_is_plain():
    w = torch.randn(8, 4, dtype=torch.float64)
    lin = BaseLinear(w)
    assert lin.mode == "plain"
    x = torch.randn(2, 4, dtype=torch.float64)
    assert torch.allclose(lin(x), x @ w.T)


def test_int8_drift_is_bounded_and_not_zero():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=g) * 0.05
    b = torch.randn(256, generator=g) * 0.1
    q = BaseLinear(w, b).quantized()
    assert q.mode == "int8" and q.nbytes() == 256 * 128
    x = torch.randn(16, 128, generator=g)
    err = rel(q(x), ref(x, w, b))
    assert 1e-4 < err < 0.03          # quantized: close (8-bit per-token activations), and really not fp32
    assert (q.dense() - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 + 1e-6


def test_quantize_model_int8(tiny_model_dir):
    fp = load_model(tiny_model_dir, CPU, torch.float32).model
    q = quantize_model(load_model(tiny_model_dir, CPU, torch.float32).model, "int8")
    assert all(lw.w_gate_up.mode == "int8" for lw in q.layers) and q.lm_head.mode == "int8"
    assert quantize_model(fp, "none") is fp and fp.lm_head.mode != "int8"
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 259, (9,), generator=g).tolist() for _ in range(3)]
    outs = []
    for m in (fp, q):
        kv, tables = KVCache.for_sequences(m.shape, [16] * 3, CPU, torch.float32)
        segs = [Segment(t, p, 0, True) for t, p in zip(tables, prompts)]
        outs.append(m.forward(make_forward_batch(segs, CPU, 16), kv.layers))
    assert outs[1].dtype == torch.float32
    assert 1e-4 < rel(outs[1], outs[0].double()) < 0.3     # drift, not garbage (~1)
    with pytest.raises(ValueError):
        quantize_model(fp, "int4")
    with pytest.raises(ValueError, match="float32"):
        quantize_model(load_model(tiny_model_dir, CPU, torch.bfloat16).model, "int8")


@pytest.mark.parametrize("mode", ["plain", "onednn", "bf16", "int8"])
def test_dense_returns_the_served_weight(mode):
    """DoRA takes row norms of the served base weight: dense() gives it back, exactly unless int8
    (bf16: the bf16-rounded weight, in fp32)."""
    from server.model.linear import BaseLinear, bf16_native
    if mode == "bf16" and not bf16_native():
        pytest.skip("no AVX512-BF16/AMX")
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    lin = BaseLinear(w, b, mode=mode, act_max=torch.rand(40, generator=g) + 0.1 if mode == "int8" else None)
    x = torch.randn(5, 40, generator=g)
    dense = lin.dense()
    assert dense.shape == (48, 40)
    assert dense.shape == (48, 40) and dense.dtype == torch.float32
    assert torch.allclose(lin(x), x @ dense.T + b, rtol=1e-4, atol={"int8": 0.5, "bf16": 0.1}.get(mode, 1e-4))
    if lin.mode == "bf16":
        assert torch.equal(dense, w.bfloat16().float())
    elif lin.mode != "int8":
        assert torch.equal(dense, w)
