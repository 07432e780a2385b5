"""permute / unpermute against the reference (SPEC.md section 3), and their gradients.

Every op test runs on each backend (``device``): inputs are built on the CPU, moved to the
backend's device, and the results compared on the CPU with the reference.
"""

import pytest
import torch

import moe_kernels as mk
from conftest import on_backends, random_ids
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ALL_OPS = ("permute", "permute_with_map", "unpermute", "unpermute_weights_grad")
MAX_EXPERTS_ON_CUDA = 1536  # 8 warps' int counts per expert in 48 KB of shared memory


def hidden_states(num_tokens, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g).to(dtype)


def combine_tolerance(dtype):
    # Both sides accumulate in fp32 (fp64 for fp64); only the summation order may differ, and
    # on a GPU the FMA contraction of weight * row + sum (one rounding fewer). Row copies, maps
    # and counts are exact on every device: copies, and integers.
    if dtype in (torch.float32, torch.float64):
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=2e-2, atol=2e-2)


def assert_permute_matches_reference(device, x, ids, num_experts, align):
    rows, row_map, counts = mk.permute(x.to(device), ids.to(device), num_experts, align=align)
    assert rows.device.type == device
    ref_rows, ref_map, ref_counts = ref.permute(x, ids, num_experts, align=align)
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(row_map.cpu(), ref_map)
    assert rows.dtype == x.dtype and torch.equal(rows.cpu(), ref_rows)  # a copy: bit-exact
    assert rows.shape[0] == int(mk.padded_tokens_per_expert(ref_counts, align).sum())
    return rows, row_map


@on_backends("permute")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 3000])
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (8, 2), (64, 8), (256, 8), (8, 8)])
@pytest.mark.parametrize("align", [1, 16])
def test_permute_matches_reference(device, dtype, num_tokens, num_experts, topk, align):
    x = hidden_states(num_tokens, 24, dtype)
    # Only 3/4 of the experts receive tokens (at least k of them).
    ids = random_ids(num_tokens, num_experts, topk, used=max(topk, 3 * num_experts // 4))
    assert_permute_matches_reference(device, x, ids, num_experts, align)


@on_backends("permute")
@pytest.mark.parametrize("num_tokens", [1, 3000])
@pytest.mark.parametrize("align", [1, 4])
def test_permute_accepts_int32_ids(device, num_tokens, align):
    x = hidden_states(num_tokens, 8)
    ids = random_ids(num_tokens, 32, 4).to(torch.int32)
    assert_permute_matches_reference(device, x, ids, 32, align)


@on_backends("permute", "unpermute")
@pytest.mark.parametrize("num_experts", [256, MAX_EXPERTS_ON_CUDA])
@pytest.mark.parametrize("align", [1, 16])
def test_permute_with_most_experts_empty(device, num_experts, align):
    # 40 tokens on 6 experts spread over the range: every other expert gets no row and no
    # padding.
    x = hidden_states(40, 16)
    ids = random_ids(40, num_experts, 2, used=6) * (num_experts // 6)
    rows, row_map = assert_permute_matches_reference(device, x, ids, num_experts, align)
    torch.testing.assert_close(mk.unpermute(rows, row_map).cpu(), 2 * x)


def test_permute_rejects_more_experts_than_cuda_supports():
    x, ids = hidden_states(4, 8), random_ids(4, 8, 2)
    with emulate(), pytest.raises(RuntimeError, match=r"num_experts must be <= 1536 on CUDA"):
        mk.permute(x, ids, MAX_EXPERTS_ON_CUDA + 1)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_cuda_skips_out_of_range_ids_and_rows(schedule):
    # The CUDA ops do not check index ranges (that would synchronise with the GPU): a pair whose
    # id is out of range gets row -1 and no row, and unpermute skips that row.
    x = hidden_states(3, 4)
    ids = torch.tensor([[0, 9], [-1, 1], [1, 0]])
    with emulate(schedule):
        rows, row_map, counts = mk.permute(x, ids, 2)
        combined = mk.unpermute(rows, row_map)
    assert counts.tolist() == [2, 2]
    assert row_map.tolist() == [[0, -1], [-1, 2], [3, 1]]
    assert torch.equal(rows, torch.stack([x[0], x[2], x[1], x[2], torch.zeros(4), torch.zeros(4)]))
    assert torch.equal(combined, torch.stack([x[0], x[1], 2 * x[2]]))


@on_backends(*ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_large_hidden_size(device, dtype, misaligned):
    # A wide row takes many packs per lane; a row that starts off a 16-byte boundary (a view
    # one element into its storage) takes the element-by-element path.
    storage = hidden_states(6 * 4096 + 1, 1, dtype).flatten()
    x = (storage[1:] if misaligned else storage[:-1]).view(6, 4096)
    ids = random_ids(6, 8, 2)
    rows, row_map = assert_permute_matches_reference(device, x, ids, 8, 4)
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    got = mk.unpermute(rows, row_map.int(), weights.to(device)).cpu()
    torch.testing.assert_close(
        got, ref.unpermute(rows.cpu(), row_map.cpu(), weights), **combine_tolerance(dtype)
    )
    ops = torch.ops.moe_kernels
    grad = hidden_states(6, 4096, dtype, seed=2)
    got_grad = ops.unpermute_weights_grad(grad.to(device), rows, row_map).cpu()
    want_grad = torch.einsum("th,tjh->tj", grad.double(), rows.cpu()[row_map.cpu()].double())
    assert got_grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got_grad, want_grad.to(got_grad.dtype), **combine_tolerance(dtype))
    scattered = ops.permute_with_map(x.to(device), row_map, weights.to(device), rows.shape[0])
    assert torch.equal(
        scattered.cpu(), ops.permute_with_map(x, row_map.cpu(), weights, rows.shape[0])
    )


@on_backends("permute")
def test_permute_is_stable_within_an_expert(device):
    ids = torch.tensor([[2, 0], [0, 2], [2, 1], [0, 1]])
    x = torch.arange(4.0).unsqueeze(1)
    rows, row_map, counts = mk.permute(x.to(device), ids.to(device), 3)
    assert counts.tolist() == [3, 2, 3]
    # expert 0: tokens 0, 1, 3; expert 1: tokens 2, 3; expert 2: tokens 0, 1, 2.
    assert rows.flatten().tolist() == [0, 1, 3, 2, 3, 0, 1, 2]
    assert row_map.tolist() == [[5, 0], [1, 6], [7, 3], [2, 4]]


@on_backends("permute")
def test_padding_rows_are_zero_and_segments_aligned(device):
    ids = torch.tensor([[0], [2], [2], [0], [0]])
    x = torch.ones(5, 3)
    rows, row_map, counts = mk.permute(x.to(device), ids.to(device), 4, align=4)
    assert counts.tolist() == [3, 0, 2, 0]
    assert rows.shape == (8, 3)  # experts 0 and 2 padded to 4 rows each; empty experts take none
    assert sorted(row_map.flatten().tolist()) == [0, 1, 2, 4, 5]
    assert rows.sum(dim=1).tolist() == [3, 3, 3, 0, 3, 3, 0, 0]


@on_backends("permute", "unpermute")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 3000])
@pytest.mark.parametrize("topk", [1, 2, 8])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_matches_reference(device, dtype, num_tokens, topk, weighted):
    x = hidden_states(num_tokens, 40, dtype)
    ids = random_ids(num_tokens, 64, topk, used=48)
    rows, row_map, _ = mk.permute(x.to(device), ids.to(device), 64, align=8)
    weights = (
        torch.rand(num_tokens, topk, generator=torch.Generator().manual_seed(1))
        if weighted
        else None
    )
    got = mk.unpermute(rows, row_map, None if weights is None else weights.to(device))
    want = ref.unpermute(rows.cpu(), row_map.cpu(), weights)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **combine_tolerance(dtype))


@on_backends("permute", "unpermute")
def test_permute_then_unpermute_weighted_is_identity(device):
    x = hidden_states(100, 16)
    ids = random_ids(100, 32, 4)
    weights = torch.full((100, 4), 0.25)
    rows, row_map, _ = mk.permute(x.to(device), ids.to(device), 32, align=4)
    torch.testing.assert_close(mk.unpermute(rows, row_map, weights.to(device)).cpu(), x)


@on_backends(*ALL_OPS)
@pytest.mark.parametrize("align", [1, 8])
def test_gradients_match_reference(device, align):
    x = hidden_states(50, 12)
    ids = random_ids(50, 16, 3, used=12)
    weights = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    scale = torch.randn(12, generator=torch.Generator().manual_seed(3))

    def run(impl, x, weights, ids, scale):
        rows, row_map, _ = impl.permute(x, ids, 16, align=align)
        return (
            impl.unpermute(rows * rows.sum(1, keepdim=True).tanh(), row_map, weights) * scale
        ).sum()

    x_dev = x.to(device).requires_grad_()
    w_dev = weights.to(device).requires_grad_()
    run(mk, x_dev, w_dev, ids.to(device), scale.to(device)).backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weights.detach().clone().requires_grad_()
    run(ref, x_ref, w_ref, ids, scale).backward()
    torch.testing.assert_close(x_dev.grad.cpu(), x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_dev.grad.cpu(), w_ref.grad, rtol=1e-5, atol=1e-6)


@on_backends(*ALL_OPS)
def test_gradcheck_fp64(device):
    x = hidden_states(7, 5, torch.float64).to(device).requires_grad_()
    ids = random_ids(7, 6, 2, used=5).to(device)
    weights = torch.rand(7, 2, dtype=torch.float64).to(device).requires_grad_()

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
