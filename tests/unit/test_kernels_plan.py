"""The plan's shape decisions, dispatch, input validation, and proof that the
kernel property tests can fail (a wrong scale or using padded ranks is caught)."""

from __future__ import annotations

import inspect

import pytest
import torch

import server.kernels as K
from server.kernels import reference as ref
from server.kernels import torch_ops
from server.kernels.contract import OPS, KernelBackend
from tests.unit.test_kernels import assert_close, run_abs


def _weights(S: int, r_max: int, d: int, ranks: torch.Tensor, gen: torch.Generator):
    A = torch.randn(S, r_max, d, generator=gen)
    B = torch.randn(S, d, r_max, generator=gen)
    for s, r in enumerate(ranks.tolist()):  # garbage in the padded ranks
        A[s, r:] += 50.0
        B[s, :, r:] -= 50.0
    return A, B, torch.rand(S, generator=gen) + 0.5


def test_decode_all_distinct_is_one_dense_view_bucket():
    plan = K.make_plan(torch.randperm(64), torch.full((64,), 16))
    assert plan.segments == ()
    (bk,) = plan.buckets
    assert (bk.first_slot, bk.num_groups, bk.group_len, bk.rank) == (0, 64, 1, 16)
    assert bk.mask is None  # no pads, homogeneous rank: nothing to mask


def test_prefill_runs_become_segments_with_exact_ranks():
    ranks = torch.tensor([4, 64, 8, 16])
    slots = torch.tensor([2, 0, 3, 1]).repeat_interleave(100)
    plan = K.make_plan(slots, ranks)
    assert plan.buckets == ()
    assert plan.segments == ((0, 100, 2, 8), (100, 200, 0, 4), (200, 300, 3, 16), (300, 400, 1, 64))


def test_rank_buckets_split_when_rank_classes_sit_in_slot_ranges():
    grouped = torch.tensor([4] * 8 + [64] * 8)  # slots 0-7 rank 4, 8-15 rank 64
    plan = K.make_plan(torch.randperm(16), grouped)
    assert [(bk.rank, bk.first_slot, bk.num_groups) for bk in plan.buckets] == [(4, 0, 8), (64, 8, 8)]
    (padded,) = K.make_plan(torch.randperm(16), grouped, rank_buckets=False).buckets
    assert padded.rank == 64 and padded.mask is not None


def test_rank_buckets_merge_when_ranks_interleave_in_the_stack():
    interleaved = torch.tensor([4, 64] * 8)  # both buckets would read all 16 slots
    (bk,) = K.make_plan(torch.randperm(16), interleaved).buckets
    assert bk.rank == 64 and bk.mask is not None


def test_bucket_rank_is_largest_true_rank_not_power_of_two():
    plan = K.make_plan(torch.tensor([0, 1, 0]), torch.tensor([5, 6]))
    assert [bk.rank for bk in plan.buckets] == [6]  # bucket 8, runs with R = 6


def test_hot_slot_is_chunked_instead_of_padding_everyone():
    gen = torch.Generator().manual_seed(0)
    hot = torch.zeros(40, dtype=torch.long)
    others = torch.arange(1, 64, 3)  # 21 single rows, spread over 64 slots
    slots = torch.cat([hot, others])[torch.randperm(61, generator=gen)]
    (bk,) = K.make_plan(slots, torch.full((64,), 16)).buckets
    assert bk.first_slot == -1 and bk.group_len < 40
    assert bk.num_groups * bk.group_len <= 22 * 40 // 2  # padding all 22 slots to 40 rows


def test_rows_without_adapter_and_empty_batch():
    plan = K.make_plan(torch.full((5,), -1), torch.tensor([3]))
    assert plan.segments == () and plan.buckets == () and plan.active_rows.numel() == 0
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    y0 = y.clone()
    K.lora(y, x, torch.randn(1, 3, 7), torch.randn(1, 7, 3), torch.ones(1), plan)
    assert torch.equal(y, y0)
    empty = K.make_plan(torch.zeros(0, dtype=torch.long), torch.tensor([3]))
    assert K.shrink(torch.randn(0, 7), torch.randn(1, 3, 7), empty).shape == (0, 3)


@pytest.mark.parametrize("slots, ranks", [
    (torch.tensor([0, 2]), torch.tensor([4, 4])),  # slot out of range
    (torch.tensor([0, 1]), torch.tensor([4, 0])),  # used slot with rank 0
])
def test_make_plan_rejects_bad_slots(slots, ranks):
    with pytest.raises(ValueError):
        K.make_plan(slots, ranks)


def test_make_plan_rejects_unknown_mode_and_ops_reject_wrong_batch():
    with pytest.raises(ValueError):
        K.make_plan(torch.tensor([0]), torch.tensor([1]), group_mode="fast")
    plan = K.make_plan(torch.tensor([0, 0]), torch.tensor([2]))
    with pytest.raises(ValueError):
        K.shrink(torch.randn(3, 4), torch.randn(1, 2, 4), plan)


def test_dispatch_is_decided_per_device_and_exports_the_contract():
    assert K.backend(torch.device("cpu")) is torch_ops
    assert K.backend_name(torch.device("cpu")) == "torch"
    assert K.reference is ref
    for name in ["make_plan", "AdapterPlan", "shrink", "expand", "lora", "lora_packed",
                 "bottleneck", "ia3", "col_scale"]:
        assert name in K.__all__ and callable(getattr(K, name))


@pytest.mark.parametrize("module", [ref, torch_ops, K])
def test_every_backend_has_the_contract_signatures(module):
    for op in OPS:
        want = list(inspect.signature(getattr(KernelBackend, op)).parameters)[1:]  # no self
        assert list(inspect.signature(getattr(module, op)).parameters) == want, op


def test_auto_means_torch_ops_until_a_gpu_run_has_passed():
    for dev in ("cpu", "cuda"):
        assert K.select_backend(torch.device(dev), "auto") is torch_ops
        assert K.select_backend(torch.device(dev), "torch") is torch_ops
    with pytest.raises(ValueError):
        K.select_backend(torch.device("cpu"), "fast")
    with pytest.raises(ValueError):
        K.configure("fast")


def test_configure_changes_the_backend_in_use():
    try:
        K.configure("torch")
        assert K.backend_name(torch.device("cpu")) == "torch"
    finally:
        K.configure("auto")


def test_ops_update_the_given_tensor_in_place():
    gen = torch.Generator().manual_seed(1)
    ranks = torch.tensor([3, 5])
    A, B, scale = _weights(2, 5, 6, ranks, gen)
    plan = K.make_plan(torch.tensor([1, -1, 0, 1]), ranks)
    y = torch.zeros(4, 6)
    ptr = y.data_ptr()
    assert K.lora(y, torch.randn(4, 6, generator=gen), A, B, scale, plan) is None
    assert y.data_ptr() == ptr and y[0].abs().sum() > 0 and not y[1].any()


def test_reference_matches_dense_float64_formula():
    gen = torch.Generator().manual_seed(2)
    ranks = torch.tensor([2, 7, 4])
    A, B, scale = _weights(3, 8, 10, ranks, gen)
    slots = torch.tensor([2, -1, 0, 1, 1, 2])
    x, y = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    want = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            r = int(ranks[s])
            want[t] += scale[s].double() * (B[s, :, :r].double() @ (A[s, :r].double() @ x[t].double()))
    ref.lora(y, x, A, B, scale, K.make_plan(slots, ranks))
    assert_close(y, want, torch.float32)


def _fast_and_ref_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.tensor([3, 16, 9, 1])
    A, B, scale = _weights(4, 16, 33, ranks, gen)
    slots = torch.randint(-1, 4, (29,), generator=gen)
    plan = K.make_plan(slots, ranks)
    x, y0 = torch.randn(29, 33, generator=gen), torch.randn(29, 33, generator=gen)
    y = y0.clone()
    K.lora(y, x, A, B, scale, plan)
    mag = run_abs(ref.lora, y0.clone(), x, A, B, scale, plan)  # as the property tests
    return y, y0, x, A, B, scale, slots, ranks, mag


def test_the_check_passes_on_the_right_answer():
    y, y0, x, A, B, scale, slots, ranks, mag = _fast_and_ref_inputs(3)
    want = y0.clone()
    ref.lora(want, x, A, B, scale, K.make_plan(slots, ranks))
    assert_close(y, want, torch.float32, mag)


def test_a_slightly_wrong_scale_is_detected():
    y, y0, x, A, B, scale, slots, ranks, mag = _fast_and_ref_inputs(3)
    want = y0.clone()
    ref.lora(want, x, A, B, scale * 1.0005, K.make_plan(slots, ranks))
    with pytest.raises(AssertionError):
        assert_close(y, want, torch.float32, mag)


def test_using_padded_rank_columns_is_detected():
    y, y0, x, A, B, scale, slots, ranks, mag = _fast_and_ref_inputs(4)
    want = y0.clone()  # a kernel that ignored slot_ranks would compute this
    ref.lora(want, x, A, B, scale, K.make_plan(slots, torch.full_like(ranks, 16)))
    with pytest.raises(AssertionError):
        assert_close(y, want, torch.float32, mag)


def test_activation_ids_matter():
    gen = torch.Generator().manual_seed(5)
    ranks = torch.tensor([4, 4])
    D, U, _ = _weights(2, 4, 8, ranks, gen)
    plan = K.make_plan(torch.tensor([0, 1, 1, 0]), ranks)
    h0 = torch.randn(4, 8, generator=gen)
    outs = []
    for act in ([0, 1], [2, 1]):  # relu vs silu on slot 0
        h = h0.clone()
        K.bottleneck(h, D, U, None, None, torch.tensor(act), plan)
        outs.append(h)
    assert not torch.allclose(outs[0][[0, 3]], outs[1][[0, 3]])
    assert torch.equal(outs[0][[1, 2]], outs[1][[1, 2]])
