"""drop_over_capacity against the reference (SPEC.md section 3), and the permute family on the
dropped pairs it marks: capacity routing end to end at the op level.

Every op test runs on each backend (``device``): inputs are built on the CPU, moved to the
backend's device, and the results compared on the CPU with the reference.
"""

import math

import pytest
import torch

import moe_kernels as mk
from conftest import on_backends, random_ids
from moe_kernels import reference as ref

POLICIES = ("probs", "position")


def routed(num_tokens, num_experts, topk, seed=0, used=None):
    """Ids from ``random_ids`` and distinct random weights (tie-free)."""
    ids = random_ids(num_tokens, num_experts, topk, seed=seed, used=used)
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(num_tokens, topk, generator=g)
    return ids, weights


def assert_drop_matches_reference(device, ids, weights, num_experts, capacity, policy):
    given = None if weights is None else weights.to(device)
    got = mk.drop_over_capacity(ids.to(device), given, num_experts, capacity, policy)
    want = ref.drop_over_capacity(ids, weights, num_experts, capacity, policy)
    for name, g, w in zip(("kept_ids", "slots", "dropped_per_expert"), got, want, strict=True):
        assert g.device.type == device and g.dtype == torch.int64, name
        assert torch.equal(g.cpu(), w), name
    return [g.cpu() for g in got]


@on_backends("drop_over_capacity")
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_tokens", [0, 1, 37, 3000])
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (8, 2), (64, 8), (256, 8)])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 1.25, 8.0])
def test_drop_matches_reference(device, policy, num_tokens, num_experts, topk, capacity_factor):
    # A quarter of the experts get no token, so the others run over any capacity below ~1.33.
    ids, weights = routed(num_tokens, num_experts, topk, used=max(topk, 3 * num_experts // 4))
    capacity = mk.expert_capacity(num_tokens, topk, num_experts, capacity_factor)
    kept_ids, slots, dropped = assert_drop_matches_reference(
        device, ids, weights if policy == "probs" else None, num_experts, capacity, policy
    )
    counts = ref.expert_histogram(ids, num_experts)
    kept_counts = torch.bincount(kept_ids[kept_ids >= 0], minlength=num_experts)
    assert torch.equal(kept_counts, counts.clamp(max=capacity))
    assert torch.equal(dropped, counts - kept_counts)
    assert torch.equal(kept_ids >= 0, slots >= 0)
    assert torch.equal(kept_ids[kept_ids >= 0], ids[kept_ids >= 0])
    # Slots number each expert's kept pairs 0, 1, ... with no gap or repeat.
    padded_rows = (kept_ids * capacity + slots)[kept_ids >= 0]
    assert padded_rows.unique().numel() == padded_rows.numel()


@on_backends("drop_over_capacity")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_probs_keeps_the_highest_weights_and_breaks_ties_by_position(device, dtype):
    # Four levels of weight only, so most comparisons are ties; NaN and -0 among them.
    num_tokens, num_experts, topk = 500, 6, 3
    ids = random_ids(num_tokens, num_experts, topk, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = torch.randint(0, 4, (num_tokens, topk), generator=g).to(dtype) / 4
    weights[::7, 0] = float("nan")
    weights[1::11, 1] = -0.0
    weights[2::13, 2] = -1.0
    capacity = mk.expert_capacity(num_tokens, topk, num_experts, 0.7)
    kept_ids, _, _ = assert_drop_matches_reference(
        device, ids, weights, num_experts, capacity, "probs"
    )
    for e in range(num_experts):
        mine = ids == e
        kept = weights[mine & (kept_ids == e)].float().nan_to_num(nan=-math.inf)
        lost = weights[mine & (kept_ids < 0)].float().nan_to_num(nan=-math.inf)
        assert kept.min() >= lost.max()


@on_backends("drop_over_capacity")
@pytest.mark.parametrize("policy", POLICIES)
def test_position_order_and_dropped_ids_take_no_capacity(device, policy):
    num_tokens, num_experts, topk = 400, 8, 2
    ids, weights = routed(num_tokens, num_experts, topk, seed=5)
    ids[::3] = -1  # padding tokens, already out of routing
    capacity = 20
    kept_ids, _, dropped = assert_drop_matches_reference(
        device, ids, weights, num_experts, capacity, policy
    )
    assert torch.equal(kept_ids[ids < 0], ids[ids < 0])
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts)
    assert torch.equal(dropped, (counts - capacity).clamp_min(0))
    if policy == "position":
        for e in range(num_experts):
            pairs = (ids == e).flatten().nonzero().flatten()
            kept_pairs = (kept_ids == e).flatten().nonzero().flatten()
            assert torch.equal(kept_pairs, pairs[:capacity])


@on_backends("drop_over_capacity")
def test_int32_ids_and_one_expert_over_a_long_segment(device):
    # Every pair on expert 0: its segment spans many tiles of the kernel's final pass.
    num_tokens = 5000
    ids = torch.zeros(num_tokens, 1, dtype=torch.int32)
    weights = torch.rand(num_tokens, 1, generator=torch.Generator().manual_seed(6))
    assert_drop_matches_reference(device, ids, weights, 3, 777, "probs")
    assert_drop_matches_reference(device, ids, None, 3, 777, "position")


@on_backends("permute", "unpermute")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("policy", POLICIES)
def test_permute_and_unpermute_skip_dropped_pairs(device, dtype, policy):
    num_tokens, num_experts, topk, hidden = 300, 8, 2, 24
    ids, weights = routed(num_tokens, num_experts, topk, seed=7, used=6)
    capacity = mk.expert_capacity(num_tokens, topk, num_experts, 1.0)
    kept_ids, _, _ = ref.drop_over_capacity(ids, weights, num_experts, capacity, policy)
    assert (kept_ids < 0).any()
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(8)).to(dtype)
    x_dev = x.to(device).clone().requires_grad_()
    w_dev = weights.to(device).clone().requires_grad_()
    rows, row_map, counts = mk.permute(x_dev, kept_ids.to(device), num_experts)
    want_rows, want_map, want_counts = ref.permute(x, kept_ids, num_experts)
    assert torch.equal(row_map.cpu(), want_map) and torch.equal(counts.cpu(), want_counts)
    assert torch.equal(rows.detach().cpu(), want_rows)
    # R is T * k on every device (known without the counts): zero rows follow the kept ones.
    kept = int(want_counts.sum())
    assert rows.shape[0] == num_tokens * topk and not want_rows[kept:].any()
    out = mk.unpermute(rows * 2, row_map, w_dev)
    want = ref.unpermute(want_rows * 2, want_map, weights)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.detach().cpu(), want, **tol)
    # A token whose pairs were all dropped gets zero: its residual path alone carries it.
    all_dropped = (kept_ids < 0).all(dim=1)
    assert not out.detach().cpu()[all_dropped].any()
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref, w_ref = x.clone().requires_grad_(), weights.clone().requires_grad_()
    ref_rows, ref_map, _ = ref.permute(x_ref, kept_ids, num_experts)
    ref.unpermute(ref_rows * 2, ref_map, w_ref).backward(grad.cpu())
    torch.testing.assert_close(x_dev.grad.cpu(), x_ref.grad, **tol)
    # A dot product over the hidden size, summed in another order.
    dot_tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.bfloat16 else tol
    torch.testing.assert_close(w_dev.grad.cpu(), w_ref.grad, **dot_tol)
    assert not w_dev.grad.cpu()[kept_ids < 0].any()


@on_backends("permute_with_map", "unpermute")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_capacity_layout_round_trips(device, dtype):
    num_tokens, num_experts, topk, hidden = 200, 4, 2, 16
    ids, weights = routed(num_tokens, num_experts, topk, seed=9)
    capacity = mk.expert_capacity(num_tokens, topk, num_experts, 0.8)
    kept_ids, slots, _ = ref.drop_over_capacity(ids, weights, num_experts, capacity, "probs")
    row_map = torch.where(kept_ids >= 0, kept_ids * capacity + slots, -1)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(10)).to(dtype)
    x_dev = x.to(device).clone().requires_grad_()
    rows = mk.permute_with_map(x_dev, row_map.to(device), None, num_experts * capacity)
    want = ref.permute_with_map(x, row_map, None, num_experts * capacity)
    assert torch.equal(rows.detach().cpu(), want)
    # Each expert's segment holds its kept rows first, in pair order, then zero rows.
    compact, _, _ = ref.permute(x, kept_ids, num_experts)
    kept_counts = torch.bincount(kept_ids[kept_ids >= 0], minlength=num_experts)
    segments = want.view(num_experts, capacity, hidden)
    assert torch.equal(
        torch.cat([segments[e, : kept_counts[e]] for e in range(num_experts)]),
        compact[: kept_counts.sum()],
    )
    out = mk.unpermute(rows, row_map.to(device), weights.to(device))
    out.sum().backward()
    # d(sum)/dx[t] is the sum of its kept weights, broadcast over the hidden size.
    kept_weight = torch.where(kept_ids >= 0, weights, 0).sum(1, keepdim=True).expand(-1, hidden)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x_dev.grad.cpu().float(), kept_weight, **tol)


def test_permute_with_map_gradients():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    row_map = torch.tensor([[0, 3], [-1, 1], [4, -1], [2, 7], [-1, -1], [6, 5]])
    torch.autograd.gradcheck(lambda x, w: mk.permute_with_map(x, row_map, w, 9), (x, w))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda i, w: mk.drop_over_capacity(i, w, 4, 2, "lowest"), "policy must be one of"),
        (lambda i, w: mk.drop_over_capacity(i, w, 4, -1), "capacity must be >= 0, got -1"),
        (lambda i, w: mk.drop_over_capacity(i, None, 4, 2), "it needs topk_weights"),
        (lambda i, w: mk.drop_over_capacity(i, w[:, :1], 4, 2), "topk_weights must have the"),
        (lambda i, w: mk.drop_over_capacity(i, w.long(), 4, 2), "topk_weights"),
        (lambda i, w: mk.drop_over_capacity(i.float(), w, 4, 2), "topk_ids"),
        (lambda i, w: mk.drop_over_capacity(i, w, 0, 2), "num_experts must be >= 1"),
        (lambda i, w: mk.drop_over_capacity(i, w, 3, 2), r"topk_ids must hold values in \[-1"),
        (lambda i, w: mk.drop_over_capacity(i - 2, w, 4, 2), r"got values in \[-2"),
    ],
)
def test_drop_over_capacity_rejects_bad_arguments(call, message):
    ids = torch.tensor([[0, 3], [1, 2]])
    weights = torch.rand(2, 2)
    before = (ids.clone(), weights.clone())
    with pytest.raises(RuntimeError, match=message):
        call(ids, weights)
    assert torch.equal(ids, before[0]) and torch.equal(weights, before[1])


def test_permute_still_rejects_ids_below_minus_one():
    with pytest.raises(RuntimeError, match=r"topk_ids must hold values in \[-1, num_experts=4\)"):
        mk.permute(torch.randn(2, 3), torch.tensor([[0, -2], [1, 2]]), 4)


def test_expert_capacity_is_the_ceiling_of_the_fair_share():
    assert mk.expert_capacity(4096, 8, 64, 1.0) == 512
    assert mk.expert_capacity(4096, 8, 64, 1.25) == 640
    assert mk.expert_capacity(10, 2, 3, 1.0) == 7  # ceil(20 / 3)
    assert mk.expert_capacity(10, 2, 3, 0.0) == 0


@on_backends("grouped_gemm", "grouped_gemm_swiglu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemms_leave_the_rows_past_the_segments(device, dtype):
    # permute's rows after dropping: segments of the kept rows, then rows of no expert.
    num_experts, hidden, ffn = 4, 32, 16
    counts = torch.tensor([5, 0, 9, 3])
    a = torch.randn(24, hidden, generator=torch.Generator().manual_seed(11)).to(dtype)
    b = (
        torch.randn(num_experts, hidden, 2 * ffn, generator=torch.Generator().manual_seed(12)) / 8
    ).to(dtype)
    kept = int(counts.sum())
    want = ref.grouped_gemm(a, b, counts)[:kept]
    got = mk.grouped_gemm(a.to(device), b.to(device), counts.to(device))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.shape == (24, 2 * ffn)
    torch.testing.assert_close(got[:kept].cpu(), want, **tol)
    out = mk.grouped_gemm_swiglu(a.to(device), b.to(device), counts.to(device))
    torch.testing.assert_close(out[:kept].cpu(), ref.swiglu(want), **tol)
