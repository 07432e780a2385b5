"""The emulator's tensor-core and async-copy primitives (mma.sync m16n8k16, ldmatrix, cp.async)
against torch, each with kernels of its own (csrc/emu/selftest_tensor_core.cpp,
selftest_async_copy.cpp): fragments placed by the PTX ISA manual's layouts give exactly
A @ B + C, a fragment-index bug gives something else, and misuse is an error naming the kernel.
"""

import math

import pytest
import torch

from conftest import TENSOR_CORE_DTYPES, bits
from conftest import exact_operand as operand
from moe_kernels import _C
from moe_kernels.emulator import emulate

selftest = _C.emulator_selftest

SCHEDULES = ("forward", "reverse")
DTYPES = TENSOR_CORE_DTYPES


def assert_product(got, expected):
    torch.testing.assert_close(
        torch.tensor(got).view(expected.shape), expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mma_with_fragments_built_by_the_ptx_layout(dtype, schedule):
    a, b = operand(16, 16, dtype, 1), operand(16, 8, dtype, 2)
    c = operand(16, 8, "bf16", 3).float()
    with emulate(schedule):
        d = selftest.mma_fragments(dtype, bits(a), bits(b), c.flatten().tolist(), False)
    assert_product(d, a.float() @ b.float() + c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_fragment_index_bug_gives_a_wrong_product(dtype):
    # a[1] and a[2] swapped: rows g+8 and columns 2t+8.. trade places in A.
    a, b = operand(16, 16, dtype, 4), operand(16, 8, dtype, 5)
    c = torch.zeros(16, 8)
    with emulate():
        d = torch.tensor(
            selftest.mma_fragments(dtype, bits(a), bits(b), c.flatten().tolist(), True)
        )
    assert not torch.allclose(d.view(16, 8), a.float() @ b.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tile_product_through_cp_async_and_ldmatrix(dtype, b_layout, schedule):
    a, b = operand(16, 32, dtype, 6), operand(32, 8, dtype, 7)
    stored = b if b_layout == "kn" else b.t()
    with emulate(schedule):
        # A [K][N] tile needs ldmatrix .trans to become b fragments; an [N][K] one does not.
        d = selftest.tile_product(dtype, b_layout, b_layout == "kn", bits(a), bits(stored))
    assert_product(d, a.float() @ b.float())


@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_ldmatrix_with_the_wrong_transposition_gives_a_wrong_product(b_layout):
    a, b = operand(16, 32, "bf16", 8), operand(32, 8, "bf16", 9)
    stored = b if b_layout == "kn" else b.t()
    with emulate():
        d = selftest.tile_product("bf16", b_layout, b_layout != "kn", bits(a), bits(stored))
    assert not torch.allclose(torch.tensor(d).view(16, 8), a.float() @ b.float())


def expected_ldmatrix(tiles, trans, order):
    """Lane l's register i: elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of tile i (or of its
    transpose), the low one in the low half; tile i's row r is the 8 elements 8j..8j+7 of row
    j = order[8i + r], as the kernel fills them."""
    out = []
    for lane in range(32):
        row, col = lane // 4, 2 * (lane % 4)
        for i in range(tiles):
            tile = [[8 * order[8 * i + r] + c for c in range(8)] for r in range(8)]
            if trans:
                tile = [list(column) for column in zip(*tile, strict=True)]
            out.append(tile[row][col] | tile[row][col + 1] << 16)
    return out


@pytest.mark.parametrize("tiles", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ldmatrix_places_each_element_as_the_ptx_manual_says(tiles, trans, schedule):
    # A permutation of the rows, so each lane's address is used for its own row; lanes past the
    # tiles' rows give a misaligned address that ldmatrix must ignore.
    order = torch.randperm(32, generator=torch.Generator().manual_seed(tiles)).tolist()
    with emulate(schedule):
        got = selftest.ldmatrix_layout(tiles, trans, order)
    assert got == expected_ldmatrix(tiles, trans, order)


@pytest.mark.parametrize(
    "misuse,threads,message",
    [
        ("misaligned", 32, r"ldmatrix: lane 3 gives row address .* which is not 16-byte aligned"),
        ("not_shared", 32, r"ldmatrix: lane 5 .* is not in shared memory"),
        ("ldmatrix_exits", 32, r"deadlock in kernel .*tensor_core_misuse.*ldmatrix .* lanes 0x80"),
        ("mma_exits", 32, r"deadlock in kernel .*tensor_core_misuse.*mma\.sync .* lanes 0x80"),
        ("none", 40, r"ldmatrix in warp 1, which has only 8 threads: it needs all 32 lanes"),
    ],
)
def test_tensor_core_misuse_is_an_error_naming_the_kernel(misuse, threads, message):
    with emulate(), pytest.raises(RuntimeError, match=message) as error:
        selftest.tensor_core_misuse(misuse, threads)
    assert "tensor_core_misuse_kernel" in str(error.value)
    with emulate():
        selftest.tensor_core_misuse("none", 32)  # the control runs


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_lands_by_the_wait(schedule):
    src = torch.arange(128, dtype=torch.float32)
    with emulate(schedule):
        out = torch.tensor(selftest.async_copy_visibility(src.tolist())).view(2, 128)
    before, after = out
    assert torch.equal(after, src)
    if schedule == "forward":  # written at the issue
        assert torch.equal(before, src)
    else:  # written at the wait: a read before it sees the shared-memory poison
        assert before.isnan().all()


@pytest.mark.parametrize(
    "copy_bytes,src_bytes", [(16, 0), (16, 5), (16, 16), (8, 3), (4, 0), (4, 4)]
)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_fills_past_src_bytes_with_zeros(copy_bytes, src_bytes, schedule):
    with emulate(schedule):
        got = selftest.async_copy_zero_fill(copy_bytes, src_bytes)
    assert got == list(range(1, src_bytes + 1)) + [0] * (copy_bytes - src_bytes)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_wait_covers_all_but_the_most_recent_groups(schedule):
    with emulate(schedule):
        got = selftest.async_copy_groups([1.0, 2.0, 3.0])
    steps = [got[i : i + 3] for i in range(0, 12, 3)]
    nan = math.nan
    if schedule == "forward":
        expected = [[1, 2, nan], [1, 2, nan], [1, 2, 3], [1, 2, 3]]
    else:
        # wait<1> lands group 0 only; a copy never committed is not covered by a wait<0>.
        expected = [[1, nan, nan], [1, 2, nan], [1, 2, nan], [1, 2, 3]]
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize(
    "misuse,message",
    [
        ("misaligned_dst", r"cp\.async of 16 bytes .* both addresses must be aligned to 16 bytes"),
        ("misaligned_src", r"cp\.async of 16 bytes .* both addresses must be aligned to 16 bytes"),
        ("global_dst", r"cp\.async .* the destination is not in shared memory"),
        ("shared_src", r"cp\.async .* the source is in shared memory"),
        ("src_bytes", r"cp\.async .* src_bytes 17 is outside \[0, 16\]"),
        ("exit_uncommitted", r"cp\.async copies still in flight at exit: 1 copies"),
        ("exit_unwaited", r"cp\.async copies still in flight at exit: 1 copies"),
    ],
)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_misuse_is_an_error_naming_the_kernel(misuse, message, schedule):
    with emulate(schedule), pytest.raises(RuntimeError, match=message) as error:
        selftest.async_copy_misuse(misuse)
    assert "async_copy_misuse_kernel" in str(error.value)
    with emulate(schedule):
        selftest.async_copy_misuse("none")  # the control runs, and nothing was left in flight


def test_dynamic_shared_memory_past_48_kb_needs_the_opt_in():
    with emulate():
        selftest.large_shared(48 * 1024, 48 * 1024)  # back to the default, whatever ran before
        with pytest.raises(RuntimeError, match="exceed the 49152 .*allow_dynamic_shared"):
            selftest.large_shared(64 * 1024, -1)
        selftest.large_shared(64 * 1024, 64 * 1024)
        selftest.large_shared(64 * 1024, -1)  # the attribute stays set
        with pytest.raises(RuntimeError, match="exceed the 65536"):
            selftest.large_shared(64 * 1024 + 16, -1)
        selftest.large_shared(227 * 1024, 227 * 1024)
        with pytest.raises(RuntimeError, match="invalid argument"):
            selftest.large_shared(227 * 1024 + 1, 227 * 1024 + 1)


def test_cost_of_the_tensor_core_collectives():
    with emulate():
        mma_us, ldmatrix_us = selftest.tensor_core_cost(2000)
    # About 2 us each on a 2-core machine (one collective of 32 fibers, then 2048 fp32 FMAs for
    # mma): a bound 25x above that only catches a collective that went pathologically slow.
    assert 0 < mma_us < 50 and 0 < ldmatrix_us < 50
