"""triton_ops vs the float32 reference, in every test run.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set here only while triton_ops is imported, when the
interpreter is chosen, and while these tests run); with one they are compiled
and run on CUDA. The cases are the property tests of test_kernels.py (dtypes,
odd sizes, ranks 1..64 with garbage in padded rank columns, rows without
adapter bit-identical, transposed/strided x and y, packed q/k/v, popularity
patterns), drawn smaller: the interpreter runs each program in Python.
A missing triton is an error here, not a skip: CI installs the gpu extra.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.kernels as K
from server.kernels import reference as ref
from server.kernels.plan import TILE_ROWS
from tests.unit.test_kernels import (
    PATTERNS, Case, _slot_pattern, assert_close, assert_untouched_rows, cases, check_expand,
    check_lora, check_lora_packed, check_shrink, run_abs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_triton_ops():
    """triton_ops with kernels built for DEVICE: interpreted on CPU, compiled on CUDA."""
    if DEVICE == "cuda":
        return importlib.import_module("server.kernels.triton_ops")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get("server.kernels.triton_ops")
        if mod is not None and not mod.INTERPRETED:  # imported earlier for the GPU
            return importlib.reload(mod)
        return importlib.import_module("server.kernels.triton_ops")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


T_OPS = _import_triton_ops()
pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while running a kernel:
    set it for these tests only (on CPU), never for the rest of the suite."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
SMALL = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
BATCHES = (0, 1, 3, 8, 13, 21, 40)  # 21, 40: more rows of one slot than a tile holds
dims = st.one_of(st.integers(1, 48), st.sampled_from([65, 97]))


def test_the_kernels_run_where_this_test_says():
    assert T_OPS.INTERPRETED == (DEVICE == "cpu")
    assert K.select_backend(torch.device(DEVICE), "triton") is T_OPS


@SMALL
@given(data=st.data(), d_in=dims)
def test_shrink(data, d_in):
    check_shrink(T_OPS, data, data.draw(cases(DEVICE, BATCHES)), d_in)


@SMALL
@given(data=st.data(), d_out=dims)
def test_expand(data, d_out):
    check_expand(T_OPS, data, data.draw(cases(DEVICE, BATCHES)), d_out)


@SMALL
@given(data=st.data(), d_in=dims, d_out=dims)
def test_lora(data, d_in, d_out):
    check_lora(T_OPS, data, data.draw(cases(DEVICE, BATCHES)), d_in, d_out)


@SMALL
@given(data=st.data(), d_in=dims, d_outs=st.lists(dims, min_size=1, max_size=3),
       gap=st.integers(0, 3))
def test_lora_packed(data, d_in, d_outs, gap):
    check_lora_packed(T_OPS, data, data.draw(cases(DEVICE, BATCHES)), d_in, d_outs, gap)


def _fixed_case(pattern: str, dtype: torch.dtype, T: int = 40, S: int = 6, r_max: int = 64,
                seed: int = 0) -> Case:
    """Decode-shaped batch of `pattern`, ranks 1..r_max, 30% rows without adapter."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, r_max + 1, (S,), generator=gen)
    ranks[0] = r_max
    slots = _slot_pattern(gen, pattern, T, S)
    slots = torch.where(torch.rand(T, generator=gen) < 0.3, -1, slots)
    plan = K.make_plan(slots.to(DEVICE), ranks.to(DEVICE))
    return Case(gen, dtype, DEVICE, slots, ranks, r_max, plan, "transposed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_lora_every_popularity_pattern(pattern, dtype):
    """Every pattern in both dtypes, d_in large enough for a split-K shrink
    (several programs per tile) and a hot slot spread over several tiles."""
    c = _fixed_case(pattern, dtype)
    if pattern in ("identical", "skewed"):
        assert int(c.plan.tiles.shape[0]) > len(set(c.slots.tolist()) - {-1})
    d_in, d_out = 200, 72
    S, T = c.ranks.numel(), c.slots.numel()
    x, y0 = c.randn(T, d_in), c.randn(T, d_out)
    A, B, scale = c.stack(S, c.r_max, d_in, 1), c.stack(S, d_out, c.r_max, 2), c.randn(S) + 2.0
    y = y0.clone()
    T_OPS.lora(y, x.t().contiguous().t(), A, B, scale, c.plan)
    want = y0.clone()
    ref.lora(want, x, A, B, scale, c.plan)
    assert_close(y, want, dtype, run_abs(ref.lora, y0.clone(), x, A, B, scale, c.plan))
    assert_untouched_rows(y, y0, c.slots)


def test_tiles_hold_rows_of_one_slot_and_split_k_is_used():
    c = _fixed_case("skewed", torch.float32, T=64)
    tiles, rows = c.plan.tiles.cpu(), c.plan.sorted_rows.cpu()
    slots = c.slots
    for start, end, s in tiles.tolist():
        assert 0 < end - start <= TILE_ROWS and set(slots[rows[start:end]].tolist()) == {s}
    assert sorted(rows.tolist()) == (slots >= 0).nonzero().flatten().tolist()
    block_k, _ = T_OPS._blocks(torch.device(DEVICE))
    assert T_OPS._split_k(1, 8 * block_k, block_k, torch.device(DEVICE)) < 8 * block_k


def test_a_broken_kernel_is_caught():
    """The comparison can fail: a shrink that reads one padded rank column too
    many (rank + 1, garbage there) is detected."""
    c = _fixed_case("uniform", torch.float32, r_max=16, seed=3)
    c.ranks[c.ranks == 16] = 15
    good = K.make_plan(c.slots.to(DEVICE), c.ranks.to(DEVICE))
    broken = K.make_plan(c.slots.to(DEVICE), (c.ranks + 1).to(DEVICE))
    x, A = c.randn(c.slots.numel(), 40), c.stack(c.ranks.numel(), 16, 40, 1)
    want = ref.shrink(x, A, good)
    assert_close(T_OPS.shrink(x, A, good), want, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(T_OPS.shrink(x, A, broken)[:, :16], want, torch.float32)


def test_triton_ops_has_the_contract_signatures():
    import inspect

    from server.kernels.contract import OPS, KernelBackend
    for op in OPS:
        want = list(inspect.signature(getattr(KernelBackend, op)).parameters)[1:]
        assert list(inspect.signature(getattr(T_OPS, op)).parameters) == want, op
