"""permute / unpermute against the reference (SPEC.md section 3), and their gradients."""

import pytest
import torch

import moe_kernels as mk
from conftest import random_ids
from moe_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hidden_states(num_tokens, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 3000])
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (8, 2), (64, 8), (256, 8), (8, 8)])
@pytest.mark.parametrize("align", [1, 16])
def test_permute_matches_reference(dtype, num_tokens, num_experts, topk, align):
    x = hidden_states(num_tokens, 24, dtype)
    # Only 3/4 of the experts receive tokens (at least k of them).
    ids = random_ids(num_tokens, num_experts, topk, used=max(topk, 3 * num_experts // 4))
    rows, row_map, counts = mk.permute(x, ids, num_experts, align=align)
    ref_rows, ref_map, ref_counts = ref.permute(x, ids, num_experts, align=align)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(row_map, ref_map)
    assert rows.dtype == dtype and torch.equal(rows, ref_rows)  # a copy: bit-exact
    assert rows.shape[0] == int(mk.padded_tokens_per_expert(counts, align).sum())


def test_permute_is_stable_within_an_expert():
    ids = torch.tensor([[2, 0], [0, 2], [2, 1], [0, 1]])
    x = torch.arange(4.0).unsqueeze(1)
    rows, row_map, counts = mk.permute(x, ids, 3)
    assert counts.tolist() == [3, 2, 3]
    # expert 0: tokens 0, 1, 3; expert 1: tokens 2, 3; expert 2: tokens 0, 1, 2.
    assert rows.flatten().tolist() == [0, 1, 3, 2, 3, 0, 1, 2]
    assert row_map.tolist() == [[5, 0], [1, 6], [7, 3], [2, 4]]


def test_padding_rows_are_zero_and_segments_aligned():
    ids = torch.tensor([[0], [2], [2], [0], [0]])
    x = torch.ones(5, 3)
    rows, row_map, counts = mk.permute(x, ids, 4, align=4)
    assert counts.tolist() == [3, 0, 2, 0]
    assert rows.shape == (8, 3)  # experts 0 and 2 padded to 4 rows each; empty experts take none
    assert sorted(row_map.flatten().tolist()) == [0, 1, 2, 4, 5]
    assert rows.sum(dim=1).tolist() == [3, 3, 3, 0, 3, 3, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 3000])
@pytest.mark.parametrize("topk", [1, 2, 8])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_matches_reference(dtype, num_tokens, topk, weighted):
    x = hidden_states(num_tokens, 40, dtype)
    ids = random_ids(num_tokens, 64, topk, used=48)
    rows, row_map, _ = mk.permute(x, ids, 64, align=8)
    weights = (
        torch.rand(num_tokens, topk, generator=torch.Generator().manual_seed(1))
        if weighted
        else None
    )
    got = mk.unpermute(rows, row_map, weights)
    want = ref.unpermute(rows, row_map, weights)
    assert got.dtype == dtype
    # Both accumulate in fp32; only the summation order may differ.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_permute_then_unpermute_weighted_is_identity():
    x = hidden_states(100, 16)
    ids = random_ids(100, 32, 4)
    weights = torch.full((100, 4), 0.25)
    rows, row_map, _ = mk.permute(x, ids, 32, align=4)
    torch.testing.assert_close(mk.unpermute(rows, row_map, weights), x)


@pytest.mark.parametrize("align", [1, 8])
def test_gradients_match_reference(align):
    x = hidden_states(50, 12).requires_grad_()
    ids = random_ids(50, 16, 3, used=12)
    weights = torch.rand(50, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    scale = torch.randn(12, generator=torch.Generator().manual_seed(3))

    def run(impl, x, weights):
        rows, row_map, _ = impl.permute(x, ids, 16, align=align)
        return (
            impl.unpermute(rows * rows.sum(1, keepdim=True).tanh(), row_map, weights) * scale
        ).sum()

    run(mk, x, weights).backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weights.detach().clone().requires_grad_()
    run(ref, x_ref, w_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64():
    x = hidden_states(7, 5, torch.float64).requires_grad_()
    ids = random_ids(7, 6, 2, used=5)
    weights = torch.rand(7, 2, dtype=torch.float64).requires_grad_()

    def permute_rows(x):
        return mk.permute(x, ids, 6, align=4)[0]

    def combine(rows, weights):
        _, row_map, _ = mk.permute(x.detach(), ids, 6, align=4)
        return mk.unpermute(rows, row_map, weights)

    rows = permute_rows(x).detach().requires_grad_()
    assert torch.autograd.gradcheck(permute_rows, (x,))
    assert torch.autograd.gradcheck(combine, (rows, weights))


def test_parallel_and_serial_runs_agree():
    # Enough pairs for several parallel chunks: the row order must not depend on threads.
    x = hidden_states(9000, 8)
    ids = random_ids(9000, 64, 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = mk.permute(x, ids, 64, align=4)
        torch.set_num_threads(max(2, threads))
        parallel = mk.permute(x, ids, 64, align=4)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(parallel[1], ref.permute(x, ids, 64, align=4)[1])
