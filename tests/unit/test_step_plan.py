"""The step's adapter plans (AdapterSlots.step -> kernels.plan_rows): made from the host-side
row -> adapter slot lists with one host->device copy each and nothing read back, holding only the
layouts the chosen kernels read, and equal to `make_plan`'s on the same rows."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from server import kernels
from server.adapters.weights import AdapterKind, AdapterWeights, BottleneckTarget, Ia3Target, LoraTarget
from server.engine.adapter_slots import AdapterSlots
from server.kernels import torch_ops
from server.kernels.plan import make_plan, plan_rows
from server.model.shape import LINEAR_MODULES, BaseModelShape

SHAPE = BaseModelShape(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=4, vocab_size=50)


def _weights(kind: AdapterKind, rank: int = 2, bias: bool = False) -> AdapterWeights:
    g = torch.Generator().manual_seed(rank)
    lora, ia3, bn = {}, {}, {}
    for layer in range(SHAPE.num_layers):
        if kind is AdapterKind.LORA:
            for m in LINEAR_MODULES:
                d_in, d_out = SHAPE.linear_dims(m)
                lora[(layer, m)] = LoraTarget(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g),
                                              0.5, torch.randn(d_out, generator=g) if bias else None)
        elif kind is AdapterKind.IA3:
            ia3[(layer, "k_proj")] = Ia3Target(torch.rand(SHAPE.kv_size, generator=g) + 0.5, on_input=False)
        else:
            d = SHAPE.hidden_size
            bn[(layer, "mlp")] = BottleneckTarget(torch.randn(rank, d, generator=g), None,
                                                  torch.randn(d, rank, generator=g), None, "relu")
    return AdapterWeights(kind, lora, ia3, bn, None, None, None, rank if kind is not AdapterKind.IA3 else 0, 0, {})


@pytest.fixture
def slots() -> AdapterSlots:
    s = AdapterSlots(SHAPE, num_slots=5, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    s.write(0, _weights(AdapterKind.LORA, 2))
    s.write(1, _weights(AdapterKind.LORA, 4, bias=True))
    s.write(2, _weights(AdapterKind.IA3))
    s.write(3, _weights(AdapterKind.BOTTLENECK, 3))
    return s


ROWS = [0, 0, 1, -1, 2, 3, 1, 0, 3, -1, 2]


def test_each_plan_holds_only_what_the_chosen_kernels_read(slots, monkeypatch):
    st = slots.step(ROWS, [])
    assert st.lora.slots.tolist() == [0, 0, 1, -1, -1, -1, 1, 0, -1, -1, -1]
    assert st.col_affine.slots.tolist() == [-1, -1, 1, -1, -1, -1, 1, -1, -1, -1, -1]   # the LoRA bias
    assert st.ia3.slots.tolist() == [-1, -1, -1, -1, 2, -1, -1, -1, -1, -1, 2]
    assert st.bn.slots.tolist() == [-1, -1, -1, -1, -1, 3, -1, -1, 3, -1, -1]
    assert st.lora.buckets is not None and st.lora.tiles is None            # torch_ops: batches
    assert st.bn.buckets is not None and st.bn.tiles is None
    for p in (st.col_affine, st.ia3):                                        # rows only
        assert p.buckets is None and p.segments is None and p.tiles is None and p.active_rows.numel() == 2
    with pytest.raises(ValueError, match="batches"):                        # a missing layout is loud
        torch_ops.lora(torch.zeros(11, 4), torch.zeros(11, 4), torch.zeros(5, 2, 4), torch.zeros(5, 4, 2),
                       torch.ones(5), st.ia3)

    tiled = types.SimpleNamespace(LAYOUT={**torch_ops.LAYOUT, "lora": "tiles", "lora_packed": "tiles"})
    monkeypatch.setattr(kernels, "backend", lambda device: tiled)           # as triton_ops declares
    st = slots.step(ROWS, [])
    assert st.lora.tiles is not None and st.lora.buckets is None and st.lora.segments is None
    assert st.bn.buckets is not None and st.bn.tiles is None


def test_plan_rows_copies_once_and_reads_nothing_back(monkeypatch):
    ranks = torch.tensor([2, 4, 1, 3])
    host_ranks = ranks.numpy().copy()
    rows = [0, 0, 1, -1, 2, 3, 1, 0, 3] + [1] * 40          # buckets, a segment, tiles
    copies = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: copies.append(a.size) or real(a))

    def read_back(*_a, **_k):
        raise AssertionError("a device tensor was read back to the host")

    for name in ("cpu", "numpy", "tolist", "item", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    plan = plan_rows(rows, host_ranks, ranks)
    assert len(copies) == 1                                  # one host->device copy for the whole plan
    monkeypatch.undo()
    with pytest.raises(AssertionError):                      # the check can fail: make_plan reads back
        for name in ("cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, read_back)
        make_plan(torch.tensor(rows), ranks)
    monkeypatch.undo()
    assert plan.segments and plan.buckets and plan.tiles.shape[0]


@pytest.mark.parametrize("rows", [[], [-1, -1], [0, 1, 0, 1, 2], [3] * 40 + [0, 2, -1, 1] * 5, list(range(4)) * 9])
@pytest.mark.parametrize("rank_buckets", [True, False])
def test_plan_rows_equals_make_plan(rows, rank_buckets):
    ranks = torch.tensor([1, 8, 3, 16])
    a = plan_rows(rows, ranks.numpy().copy(), ranks, rank_buckets=rank_buckets)
    b = make_plan(torch.tensor(rows, dtype=torch.long), ranks, rank_buckets=rank_buckets)
    assert a.num_tokens == b.num_tokens and a.segments == b.segments and len(a.buckets) == len(b.buckets)
    for name in ("slots", "slot_ranks", "active_rows", "active_slots", "sorted_rows", "tiles"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(a.buckets, b.buckets):
        for f in x.__dataclass_fields__:
            u, v = getattr(x, f), getattr(y, f)
            assert (torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v), f
        if x.mask is not None:
            assert x.mask.dtype == torch.float32 and x.mask.shape == (x.num_groups, x.group_len, x.rank)


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layouts"):
        plan_rows([0], np.ones(1, np.int64), torch.ones(1, dtype=torch.long), layouts=("fast",))


def test_slots_are_sized_by_use_and_growth_keeps_what_they_hold():
    """Issue 22: nothing is allocated at start; the stacks grow to the slots written (doubling) and to
    the rank bucket of the largest adapter, and a resident adapter's output is the same after growth."""
    from server.engine.adapter_slots import rank_bucket
    s = AdapterSlots(SHAPE, num_slots=64, max_rank=64, device=torch.device("cpu"), dtype=torch.float32)
    assert s.nbytes == 0 and s.capacity == 0
    assert [rank_bucket(r, 64) for r in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64] and rank_bucket(5, 4) == 4
    s.write(0, _weights(AdapterKind.LORA, 2, bias=True))
    s.write(1, _weights(AdapterKind.BOTTLENECK, 3))
    small = s.nbytes
    assert (s.capacity, s.r) == (4, 8) and small > 0

    def outputs() -> list[torch.Tensor]:
        x = torch.randn(4, SHAPE.hidden_size, generator=torch.Generator().manual_seed(1))
        st = s.step([0, 1, 0, -1], [])
        y = st.post_linear(1, "qkv", x, torch.zeros(4, sum(s.out_dims["qkv"])))
        h = st.block_out(0, "mlp", x.clone())
        return [y, h]

    before = outputs()
    s.write(9, _weights(AdapterKind.LORA, 40))                     # slot 9, rank 40: capacity 10, rank 64
    assert (s.capacity, s.r) == (10, 64) and s.nbytes > small
    for a, b in zip(before, outputs()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    full = AdapterSlots(SHAPE, num_slots=64, max_rank=64, device=torch.device("cpu"), dtype=torch.float32)
    full._grow(63, 64)
    assert s.nbytes < full.nbytes / 3                              # what every slot at max rank would take
