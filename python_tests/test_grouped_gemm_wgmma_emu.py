"""The Hopper grouped GEMM (wgmma + the tensor copy engine, csrc/grouped_gemm/wgmma_kernels.cuh)
on the emulator, beyond what test_grouped_gemm.py proves of every kernel (the emulated device
is an sm_90, so "auto" runs this kernel for aligned bf16/fp16 there): ragged expert boundaries
never bring another expert's rows into a result, and the kernel built with a bug (wrong swizzle,
a stage released before its wgmma completed, a wrong phase parity) computes a wrong product.
"""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _C
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate

selftest = _C.emulator_selftest
SCHEDULES = ("forward", "reverse")


def bf16_bits(t):
    return t.to(torch.bfloat16).contiguous().view(torch.int16).flatten().tolist()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_poisoned_expert_leaves_its_neighbours_exact(schedule, dtype):
    """Expert 1's rows are NaN. A row tile of expert 0 loads them (whole 64-row boxes) and a
    K-slice of expert 0's weight gradient ends inside expert 1's rows: neither may reach expert 0
    or 2's results."""
    sizes = [70, 5, 130]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(sum(sizes), 64, generator=g).to(dtype)
    grad_c = torch.randn(sum(sizes), 128, generator=g).to(dtype)
    a[70:75] = float("nan")
    grad_c[70:75] = float("nan")
    b = torch.randn(3, 64, 128, generator=g).to(dtype)
    counts = torch.tensor(sizes)
    with emulate(schedule):
        c = mk.grouped_gemm(a, b, counts)
        grad_b = mk.grouped_gemm_wgrad(a, grad_c, counts)
    expected = ref.grouped_gemm(a.float(), b.float(), counts)
    for rows in (slice(0, 70), slice(75, 205)):
        torch.testing.assert_close(c[rows].float(), expected[rows], rtol=2e-2, atol=2e-2)
    assert torch.isnan(c[70:75]).all()
    for e, rows in ((0, slice(0, 70)), (2, slice(75, 205))):
        want = a[rows].float().T @ grad_c[rows].float()
        torch.testing.assert_close(grad_b[e].float(), want, rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize(
    "mutation,schedules",
    [
        ("wrong_swizzle", SCHEDULES),
        # Under "forward" the hardware is as quick as can be: a released stage was read already,
        # a wait for the wrong phase finds the copy landed. The late schedules show both.
        ("no_wait", ("reverse",)),
        ("wrong_parity", ("reverse",)),
    ],
)
def test_the_kernel_built_with_a_bug_computes_a_wrong_product(mutation, schedules):
    # K = 320: five K-slices, more than the four stages of the ring, so stages are reused.
    sizes, k, n = [130, 0, 70], 320, 128
    g = torch.Generator().manual_seed(1)
    a = torch.randn(sum(sizes), k, generator=g).to(torch.bfloat16)
    b = torch.randn(len(sizes), n, k, generator=g).to(torch.bfloat16)
    expected = ref.grouped_gemm(a.float(), b.float(), torch.tensor(sizes), trans_b=True)
    with emulate("reverse"):  # the control: the same kernel without the bug
        good = torch.tensor(
            selftest.wgmma_gemm_mutant("none", bf16_bits(a), bf16_bits(b), sizes, k, n)
        )
    torch.testing.assert_close(good.view(-1, n), expected, rtol=2e-2, atol=2e-1)
    for schedule in schedules:
        with emulate(schedule):
            try:
                got = selftest.wgmma_gemm_mutant(mutation, bf16_bits(a), bf16_bits(b), sizes, k, n)
            except RuntimeError as error:
                # Caught otherwise: work left in flight at the end, or waits that can never
                # complete (a consumer a phase ahead of the producer), which would hang a GPU.
                assert "in flight" in str(error) or "deadlock" in str(error), error
                continue
        got = torch.tensor(got).view(-1, n)
        assert not torch.allclose(got, expected, rtol=2e-2, atol=2e-1), (mutation, schedule)
