"""grouped_gemm against the reference (SPEC.md section 4): forward, dA and dB."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref

SEGMENTS = {
    "uniform": [16, 16, 16, 16],
    "skewed_with_empty": [0, 37, 1, 0, 90, 5, 0, 2],
    "single_expert": [33],
    "all_empty": [0, 0, 0],
    "many_experts": [3, 0, 7, 1] * 16,
}


def operands(sizes, k, n, dtype, trans_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, e = sum(sizes), len(sizes)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(e, n, k, generator=g) if trans_b else torch.randn(e, k, n, generator=g)
    return a.to(dtype), b.to(dtype), torch.tensor(sizes, dtype=torch.int64)


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_fp32_reference(case, trans_b, dtype):
    a, b, sizes = operands(SEGMENTS[case], 24, 40, dtype, trans_b)
    got = mk.grouped_gemm(a, b, sizes, trans_b=trans_b)
    want = ref.grouped_gemm(a.float(), b.float(), sizes, trans_b=trans_b)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


def test_int32_counts_and_large_k():
    a, b, sizes = operands([100, 0, 300], 130, 70, torch.float32, False)
    got = mk.grouped_gemm(a, b, sizes.int())
    torch.testing.assert_close(got, ref.grouped_gemm(a, b, sizes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["uniform", "skewed_with_empty", "all_empty"])
@pytest.mark.parametrize("trans_b", [False, True])
def test_backward_matches_reference(case, trans_b):
    a, b, sizes = operands(SEGMENTS[case], 12, 20, torch.float32, trans_b)
    a.requires_grad_(), b.requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    upstream = torch.randn(a.shape[0], 20, generator=torch.Generator().manual_seed(9))
    (mk.grouped_gemm(a, b, sizes, trans_b) * upstream).sum().backward()
    (ref.grouped_gemm(a_ref, b_ref, sizes, trans_b) * upstream).sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-4, atol=1e-5)
    for e, size in enumerate(sizes.tolist()):
        if size == 0:
            assert torch.count_nonzero(b.grad[e]) == 0  # empty experts get a zero gradient


def test_backward_with_broadcast_gradient():
    # .sum() hands backward a stride-0 gradient (torch._grouped_mm's backward fails on it).
    a, b, sizes = operands([5, 0, 9], 8, 6, torch.float32, False)
    a.requires_grad_(), b.requires_grad_()
    mk.grouped_gemm(a, b, sizes).sum().backward()
    row_sums = b.detach().sum(dim=2)  # d(sum(a_e @ b_e))/d(a_e) = each row of b_e summed
    torch.testing.assert_close(
        a.grad, torch.cat([row_sums[0].expand(5, 8), row_sums[2].expand(9, 8)])
    )
    torch.testing.assert_close(b.grad[0], a.detach()[:5].sum(0).unsqueeze(1).expand(8, 6))
    assert torch.count_nonzero(b.grad[1]) == 0


@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck_fp64(trans_b):
    a, b, sizes = operands([3, 0, 4, 1], 5, 6, torch.float64, trans_b)
    a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mk.grouped_gemm(a, b, sizes, trans_b), (a, b))
