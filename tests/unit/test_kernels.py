"""Batched adapter ops vs the float32 reference loop (punica-style property tests).

Every case draws: dtype (fp32, bf16), odd and even hidden sizes (1..130, 257),
heterogeneous ranks 1..64 in one batch with garbage in the padded rank
columns, batch sizes including 0, 1 and odd ones, adapter popularity (all
distinct, uniform, zipf, all identical, one skewed, no adapter at all), rows
with no adapter, decode-shaped (any slot order) or prefill-shaped (contiguous
runs) batches, non-contiguous x/y, and every execution path of the plan
(segments, view buckets, gather buckets, SGMV loop, rank buckets on/off).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.kernels as K
from server.kernels import reference as ref
from server.kernels.plan import MIN_SEGMENT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed", "none"]


@dataclass
class Case:
    gen: torch.Generator
    dtype: torch.dtype
    device: str
    slots: torch.Tensor  # [T]
    ranks: torch.Tensor  # [S]
    r_max: int
    plan: K.AdapterPlan
    layout: str  # how x / y are laid out in memory

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen) * scale
        return t.to(self.device, self.dtype)

    def stack(self, S: int, rows: int, cols: int, rank_dim: int) -> torch.Tensor:
        """Random [S, rows, cols] weights; padded rank rows/cols are garbage (x100)."""
        w = torch.randn(S, rows, cols, generator=self.gen) / max(1, cols) ** 0.5
        for s, r in enumerate(self.ranks.tolist()):
            pad = w[s, r:] if rank_dim == 1 else w[s, :, r:]
            pad.mul_(100.0).add_(3.0)  # never zero, never used
        return w.to(self.device, self.dtype)


def _slot_pattern(gen: torch.Generator, pattern: str, n: int, S: int) -> torch.Tensor:
    if n == 0 or pattern == "none":
        return torch.full((n,), -1, dtype=torch.long)
    if pattern == "distinct":
        return torch.randperm(S, generator=gen).repeat(n // S + 1)[:n]
    if pattern == "uniform":
        return torch.randint(0, S, (n,), generator=gen)
    if pattern == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n, replacement=True, generator=gen)
    if pattern == "identical":
        return torch.full((n,), int(torch.randint(0, S, (1,), generator=gen)))
    if pattern == "skewed":
        s = torch.randint(0, S, (n,), generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.8, s[:1].expand(n), s)
    raise AssertionError(pattern)


BATCHES = (0, 1, 2, 3, 5, 8, 13, 31, 40, 64, 70)


@st.composite
def cases(draw, device: str, batches: tuple[int, ...] = BATCHES) -> Case:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    S = draw(st.integers(1, 9))
    r_max = draw(st.integers(1, 64))
    ranks = torch.randint(1, r_max + 1, (S,), generator=gen)
    if draw(st.booleans()):  # rank classes in slot ranges, as the cache lays them out
        ranks = ranks.sort().values
    T = draw(st.sampled_from(batches))
    pattern = draw(st.sampled_from(PATTERNS))
    if draw(st.booleans()):  # prefill-shaped: contiguous runs, one slot each
        lens = torch.randint(1, max(2, T // 2 + 1), (T + 1,), generator=gen)
        seq_slots = _slot_pattern(gen, pattern, T + 1, S)
        slots = torch.repeat_interleave(seq_slots, lens)[:T]
    else:  # decode-shaped: one token per sequence, any slot order
        slots = _slot_pattern(gen, pattern, T, S)
    if draw(st.booleans()):  # some rows without adapter
        slots = torch.where(torch.rand(T, generator=gen) < 0.3, -1, slots)
    plan = K.make_plan(
        slots.to(device), ranks.to(device),
        min_segment=draw(st.sampled_from([1, 4, MIN_SEGMENT, 10**9])),
        rank_buckets=draw(st.booleans()),
        group_mode=draw(st.sampled_from([None, "view", "gather"])),
        loop=draw(st.sampled_from([None, True, False])),  # SGMV loop vs padded bmm
    )
    return Case(gen, draw(st.sampled_from([torch.float32, torch.bfloat16])), device,
                slots, ranks, r_max, plan, draw(st.sampled_from(["contig", "transposed", "strided"])))


dims = st.one_of(st.integers(1, 130), st.just(257))


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as t [T, d], in a non-contiguous layout (a view into a buffer)."""
    if layout == "transposed":  # column-major copy (never an alias of t)
        return t.new_empty(t.shape[1], t.shape[0]).copy_(t.t()).t()
    if layout == "strided":
        buf = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype, device=t.device)
        buf[:, 1::2] = t
        return buf[:, 1::2]
    return t.clone()


def engine_layout(B: torch.Tensor) -> torch.Tensor:
    """The same [S, d_out, r] values as a transposed view of a contiguous [S, r, d_out]
    stack: how server/engine/adapter_slots.py stores B and U."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def assert_close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                 magnitude: torch.Tensor | None = None) -> None:
    """Norm-relative error and elementwise closeness within the dtype's tolerance.

    `magnitude` is the reference run on |inputs|: the size of the computation,
    which equals |want| when nothing cancels. Errors are measured against it so
    that a y0 + delta that happens to cancel (one bf16 element) is not flaky."""
    tol = TOL[dtype]
    out, want = out.double().cpu(), want.double().cpu()
    mag = want.abs() if magnitude is None else magnitude.double().cpu().abs()
    err = (out - want).norm() / mag.norm().clamp_min(1e-30)
    assert err <= tol, f"norm-relative error {err:.3g} > {tol}"
    atol = tol * float(mag.max()) if mag.numel() else 0.0
    torch.testing.assert_close(out, want, rtol=tol, atol=atol)


def run_abs(op, *args) -> torch.Tensor:
    """Reference op on |args| (tensors only); returns its (first) output."""
    args = [a.abs() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    res = op(*args)
    return args[0] if res is None else res


def assert_untouched_rows(out: torch.Tensor, before: torch.Tensor, slots: torch.Tensor) -> None:
    none = (slots == -1).nonzero().flatten().to(out.device)
    assert torch.equal(out[none], before[none]), "a row without adapter changed"


# ---------------------------------------------------------------- properties
# check_<op>(ops, data, c, ...) runs one drawn case through backend module `ops`
# (server.kernels dispatch here; triton_ops in test_kernels_triton.py).


def check_shrink(ops, data, c: Case, d_in: int) -> None:
    S = c.ranks.numel()
    x, A = c.randn(c.slots.numel(), d_in), c.stack(S, c.r_max, d_in, rank_dim=1)
    v = ops.shrink(laid_out(x, c.layout), A, c.plan)
    assert v.shape == (c.slots.numel(), c.r_max) and v.dtype == c.dtype
    assert_close(v, ref.shrink(x, A, c.plan), c.dtype, run_abs(ref.shrink, x, A, c.plan))
    assert not v[(c.slots == -1).to(v.device)].any(), "rows without adapter must be zero"


def check_expand(ops, data, c: Case, d_out: int) -> None:
    S, T = c.ranks.numel(), c.slots.numel()
    v = c.randn(T, c.r_max)  # padded rank columns of v are garbage too
    B, scale = c.stack(S, d_out, c.r_max, rank_dim=2), c.randn(S) + 2.0
    if data.draw(st.booleans()):
        B = engine_layout(B)
    y0 = c.randn(T, d_out)
    y = laid_out(y0, c.layout)
    base = y._base
    ops.expand(y, v, B, scale, c.plan)
    want = y0.clone()
    ref.expand(want, v, B, scale, c.plan)
    assert_close(y, want, c.dtype, run_abs(ref.expand, y0.clone(), v, B, scale, c.plan))
    assert_untouched_rows(y, y0, c.slots)
    if c.layout == "strided":  # written through the view, nothing else
        assert torch.equal(base[:, 0::2], torch.zeros_like(base[:, 0::2]))


def check_lora(ops, data, c: Case, d_in: int, d_out: int) -> None:
    S, T = c.ranks.numel(), c.slots.numel()
    x, y0 = c.randn(T, d_in), c.randn(T, d_out)
    A, B = c.stack(S, c.r_max, d_in, 1), c.stack(S, d_out, c.r_max, 2)
    if data.draw(st.booleans()):
        B = engine_layout(B)
    scale = c.randn(S) + 2.0
    y = laid_out(y0, c.layout)
    ops.lora(y, laid_out(x, c.layout), A, B, scale, c.plan)
    want = y0.clone()
    ref.lora(want, x, A, B, scale, c.plan)
    assert_close(y, want, c.dtype, run_abs(ref.lora, y0.clone(), x, A, B, scale, c.plan))
    assert_untouched_rows(y, y0, c.slots)


def check_lora_packed(ops, data, c: Case, d_in: int, d_outs: list[int], gap: int) -> None:
    """q/k/v-style: one packed A, one B per target, each writing its own column
    slice of a fused output with `gap` foreign columns between slices."""
    S, T, n = c.ranks.numel(), c.slots.numel(), len(d_outs)
    x = c.randn(T, d_in)
    A_packed = torch.cat([c.stack(S, c.r_max, d_in, 1) for _ in range(n)], 1)
    B_list = [c.stack(S, d, c.r_max, 2) for d in d_outs]
    if data.draw(st.booleans()):
        B_list = [engine_layout(B) for B in B_list]
    scales = [c.randn(S) + 2.0 for _ in range(n)]
    offs = [sum(d_outs[:i]) + gap * (i + 1) for i in range(n + 1)]
    out_slices = [slice(offs[i], offs[i] + d_outs[i]) for i in range(n)]
    y0 = c.randn(T, offs[-1] + gap)
    y = laid_out(y0, c.layout)
    ops.lora_packed(y, laid_out(x, c.layout), A_packed, B_list, scales, out_slices, c.plan)
    want = y0.clone()
    ref.lora_packed(want, x, A_packed, B_list, scales, out_slices, c.plan)
    mag = y0.abs()
    ref.lora_packed(mag, x.abs(), A_packed.abs(), [b.abs() for b in B_list],
                    [sc.abs() for sc in scales], out_slices, c.plan)
    assert_close(y, want, c.dtype, mag)
    assert_untouched_rows(y, y0, c.slots)
    foreign = torch.ones(y0.shape[1], dtype=torch.bool)
    for sl in out_slices:
        foreign[sl] = False
    assert torch.equal(y[:, foreign], y0[:, foreign]), "columns outside out_slices changed"


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data(), d_in=dims)
def test_shrink(device, data, d_in):
    check_shrink(K, data, data.draw(cases(device)), d_in)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data(), d_out=dims)
def test_expand(device, data, d_out):
    check_expand(K, data, data.draw(cases(device)), d_out)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data(), d_in=dims, d_out=dims)
def test_lora(device, data, d_in, d_out):
    check_lora(K, data, data.draw(cases(device)), d_in, d_out)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data(), d_in=dims, d_outs=st.lists(dims, min_size=1, max_size=3),
       gap=st.integers(0, 3))
def test_lora_packed(device, data, d_in, d_outs, gap):
    check_lora_packed(K, data, data.draw(cases(device)), d_in, d_outs, gap)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data(), d=dims, biases=st.booleans())
def test_bottleneck(device, data, d, biases):
    c = data.draw(cases(device))
    S, T = c.ranks.numel(), c.slots.numel()
    D, U = c.stack(S, c.r_max, d, 1), c.stack(S, d, c.r_max, 2)
    if data.draw(st.booleans()):
        U = engine_layout(U)
    bd = c.randn(S, c.r_max) if biases else None  # padded columns of bd: garbage
    bu = c.randn(S, d) if biases else None
    act = torch.randint(0, 3, (S,), generator=c.gen).to(device)
    h0 = c.randn(T, d)
    h = laid_out(h0, c.layout)
    K.bottleneck(h, D, U, bd, bu, act, c.plan)
    want = h0.clone()
    ref.bottleneck(want, D, U, bd, bu, act, c.plan)
    assert_close(h, want, c.dtype, run_abs(ref.bottleneck, h0.clone(), D, U, bd, bu, act, c.plan))
    assert_untouched_rows(h, h0, c.slots)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), d=dims)
def test_ia3(device, data, d):
    c = data.draw(cases(device))
    S, T = c.ranks.numel(), c.slots.numel()
    vec, y0 = c.randn(S, d) + 1.0, c.randn(T, d)
    y = laid_out(y0, c.layout)
    K.ia3(y, vec, c.plan)
    want = y0.clone()
    ref.ia3(want, vec, c.plan)
    assert_close(y, want, c.dtype, run_abs(ref.ia3, y0.clone(), vec, c.plan))
    assert_untouched_rows(y, y0, c.slots)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), d=dims, with_shift=st.booleans())
def test_col_scale(device, data, d, with_shift):
    """DoRA's column scale (and LoRA-bias shift): rows with no adapter stay bit-identical."""
    c = data.draw(cases(device))
    S, T = c.ranks.numel(), c.slots.numel()
    scale, y0 = c.randn(S, d) + 1.0, c.randn(T, d)
    shift = c.randn(S, d) if with_shift else None
    y = laid_out(y0, c.layout)
    K.col_scale(y, scale, shift, c.plan)
    want = y0.clone()
    ref.col_scale(want, scale, shift, c.plan)
    assert_close(y, want, c.dtype, run_abs(ref.col_scale, y0.clone(), scale, shift, c.plan))
    assert_untouched_rows(y, y0, c.slots)
    if (c.slots >= 0).any():  # the op really changes adapter rows (the comparison can fail)
        assert not torch.equal(y, y0)
