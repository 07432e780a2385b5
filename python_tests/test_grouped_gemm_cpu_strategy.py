"""The CPU grouped GEMMs' strategies (grouped_gemm_blas.cpp) against the reference: forward,
weight gradient and the SwiGLU epilogue, fp32 and bf16, on 1 and 2 threads.

Each call picks its schedule from the segment sizes and the thread count: whole experts per
thread when the experts, dealt largest first to the least loaded thread, leave the busiest at
most 1.15 times an even share; else one expert at a time on every thread (always on one
thread). ``experts_per_thread`` restates that rule, so that each case below is known to take
the branch its name says. bf16 is multiplied in fp32 where torch has no native bf16 GEMM (no
AVX-512 or AMX), and by the library elsewhere: whichever this machine takes, it must match.
"""

import pytest
import torch
from test_grouped_gemm import assert_as_accurate_as_torch

import moe_kernels as mk
from moe_kernels import reference as ref

_ops = torch.ops.moe_kernels

# Rows per expert; each case names the schedule it takes on 2 threads (1 thread: one at a time).
SEGMENTS = {
    "balanced_with_empty": ([40, 37, 0, 41, 38, 0, 39, 36, 40], True),
    "many_small": ([3, 0, 7, 1, 5, 2] * 12, True),
    "one_dominant": ([200, 3, 0, 5, 9], False),
    "fewer_than_threads": ([0, 57, 0], False),
    "all_empty": ([0, 0, 0, 0], True),  # nothing to balance: zero-filled wgrads per thread
}
DTYPES = [torch.float32, torch.bfloat16]
K, N = 72, 40


def experts_per_thread(sizes: list[int], threads: int) -> bool:
    if threads == 1:
        return False
    load = [0] * threads
    for size in sorted(sizes, reverse=True):
        load[load.index(min(load))] += size
    return max(load) * threads <= 1.15 * sum(sizes)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def operands(sizes, k, n, dtype, trans_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(sizes), k, generator=g)
    b = torch.randn(len(sizes), *((n, k) if trans_b else (k, n)), generator=g)
    return a.to(dtype), b.to(dtype), torch.tensor(sizes, dtype=torch.int64)


@pytest.mark.parametrize("case", sorted(SEGMENTS))
def test_cases_take_their_branch(case):
    sizes, per_thread = SEGMENTS[case]
    assert experts_per_thread(sizes, 2) == per_thread
    assert not experts_per_thread(sizes, 1)


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(threads, case, trans_b, dtype):
    a, b, counts = operands(SEGMENTS[case][0], K, N, dtype, trans_b)
    got = mk.grouped_gemm(a, b, counts, trans_b=trans_b)
    exact = ref.grouped_gemm(a.double(), b.double(), counts, trans_b)
    assert_as_accurate_as_torch(got, exact, ref.grouped_gemm(a, b, counts, trans_b))


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradient(threads, case, trans_b, dtype):
    sizes = SEGMENTS[case][0]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(sum(sizes), K, generator=g).to(dtype)
    grad_c = torch.randn(sum(sizes), N, generator=g).to(dtype)
    counts = torch.tensor(sizes, dtype=torch.int64)
    got = mk.grouped_gemm_wgrad(a, grad_c, counts, trans_b=trans_b)

    def wgrad(a, grad_c):
        products = [
            g_e.t() @ a_e if trans_b else a_e.t() @ g_e
            for a_e, g_e in zip(a.split(sizes), grad_c.split(sizes), strict=True)
        ]
        return torch.stack(products)

    assert_as_accurate_as_torch(got, wgrad(a.double(), grad_c.double()), wgrad(a, grad_c))
    for e, size in enumerate(sizes):
        if size == 0:
            assert not got[e].any(), "an expert without rows gets a zero gradient"


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(threads, case, dtype):
    a, b, counts = operands(SEGMENTS[case][0], K, 2 * N, dtype, trans_b=True)
    out, pre = _ops.grouped_gemm_swiglu(a, b, counts, True, "kernel")
    exact = ref.grouped_gemm(a.double(), b.double(), counts, True)
    assert_as_accurate_as_torch(pre, exact, ref.grouped_gemm(a, b, counts, True))
    # The epilogue runs on each expert's rounded product, as the reference's SwiGLU does.
    torch.testing.assert_close(out, ref.swiglu(pre))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(
        mk.swiglu_backward(grad_out, pre), ref.swiglu_backward(grad_out, pre)
    )


@pytest.mark.parametrize("case", ["balanced_with_empty", "many_small"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_schedules_agree_bitwise(case, dtype):
    """Whole experts per thread (2 threads) and one at a time on one thread run the same
    single-threaded GEMM per expert: the same bits."""
    a, b, counts = operands(SEGMENTS[case][0], K, 2 * N, dtype, trans_b=True)
    grad_c = torch.randn(a.shape[0], 2 * N, generator=torch.Generator().manual_seed(3))
    grad_c = grad_c.to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                (
                    *_ops.grouped_gemm_swiglu(a, b, counts, True, "kernel"),
                    mk.grouped_gemm(grad_c, b, counts, trans_b=False),
                    mk.grouped_gemm_wgrad(a, grad_c, counts, trans_b=True),
                )
            )
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)
