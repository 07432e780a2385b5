"""The emulator's Hopper units (wgmma, the tensor copy engine, mbarriers, elect, setmaxnreg)
against torch and against an independent description proven on hardware: CuTe's GMMA layouts
(cute/atom/mma_traits_sm90_gmma.hpp: the accumulator layout CLayout_64xN and the 128B-swizzle
shared-memory atoms), re-expressed here as shape:stride layouts and a Swizzle<B, M, S> functor.
The kernels are in csrc/emu/selftest_hopper.cpp. A wrong descriptor field, a missing wait or a
wrong phase parity must give a wrong product; misuse is an error naming the kernel.
"""

import pytest
import torch

from conftest import TENSOR_CORE_DTYPES, bits
from conftest import exact_operand as operand
from moe_kernels import _C
from moe_kernels.emulator import emulate

selftest = _C.emulator_selftest

SCHEDULES = ("forward", "reverse")
DTYPES = TENSOR_CORE_DTYPES


# ---- CuTe's layout algebra, as much of it as the definitions need


def flatten(shape, stride):
    if isinstance(shape, tuple):
        pairs = []
        for s, d in zip(shape, stride, strict=True):
            pairs += flatten(s, d)
        return pairs
    return [(shape, stride)]


def layout(shape, stride):
    """A CuTe layout shape:stride as a function of its (colexicographic) linear coordinate."""
    modes = flatten(shape, stride)

    def offset(i):
        total = 0
        for size, step in modes:
            total += i % size * step
            i //= size
        return total

    return offset


def swizzle(bits_, base, shift):
    """CuTe's Swizzle<B, M, S>: bits [M + S, M + S + B) XORed into [M, M + B)."""
    mask = ((1 << bits_) - 1) << (base + shift)
    return lambda x: x ^ ((x & mask) >> shift)


def test_accumulators_sit_where_cutes_gmma_c_layout_says():
    """CLayout_64xN = ((4, 8, 4), (2, 2, N / 8)) : ((128, 1, 16), (64, 8, 512)) maps (thread,
    value) to the column-major index m + 64 n of the 64 x N tile: the raw registers the emulated
    wgmma leaves, placed by it, give A @ B."""
    a, b = operand(64, 64, "bf16", 1), operand(64, 128, "bf16", 2)
    with emulate():
        frags = selftest.wgmma_tile("bf16", False, False, bits(a), bits(b.t()), "none")
    c_layout = layout(((4, 8, 4), (2, 2, 128 // 8)), ((128, 1, 16), (64, 8, 512)))
    d = torch.full((64 * 128,), float("nan"))
    for thread in range(128):
        for value in range(64):
            d[c_layout(thread + 128 * value)] = frags[thread * 64 + value]
    expected = a.float() @ b.float()
    torch.testing.assert_close(d.view(128, 64).t(), expected, rtol=0, atol=0)


def tile_from_fragments(frags):
    """D from the registers by the layout device/wgmma.h documents (which the kernels use)."""
    d = torch.empty(64, 128)
    for thread in range(128):
        warp, lane = divmod(thread, 32)
        for i in range(16):
            for h in range(2):
                for j in range(2):
                    d[16 * warp + lane // 4 + 8 * h, 8 * i + 2 * (lane % 4) + j] = frags[
                        thread * 64 + 4 * i + 2 * h + j
                    ]
    return d


def stored(a, b, trans_a, trans_b):
    """The operands as global memory holds them: K-major A is [M, K], MN-major [K, M]; K-major B
    is [N, K], MN-major [K, N]."""
    return bits(a.t() if trans_a else a), bits(b if trans_b else b.t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True], ids=["a_k_major", "a_mn_major"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b_k_major", "b_mn_major"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_wgmma_of_every_operand_layout(dtype, trans_a, trans_b, schedule):
    a, b = operand(64, 64, dtype, 3), operand(64, 128, dtype, 4)
    with emulate(schedule):
        frags = selftest.wgmma_tile(
            dtype, trans_a, trans_b, *stored(a, b, trans_a, trans_b), "none"
        )
    torch.testing.assert_close(tile_from_fragments(frags), a.float() @ b.float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "mutation,trans_b,schedules",
    [
        ("swizzle", False, SCHEDULES),
        ("stride", False, SCHEDULES),
        ("stride", True, SCHEDULES),
        ("leading", True, SCHEDULES),
        # The late schedules only: under "forward" the work is done at the issue, as if the
        # hardware had been quick, which a correct kernel must allow.
        ("no_wait", False, ("reverse",)),
        ("wrong_parity", False, ("reverse",)),
        ("no_expect_tx", False, ("reverse",)),
    ],
)
def test_a_wrong_descriptor_wait_or_parity_gives_a_wrong_product(mutation, trans_b, schedules):
    a, b = operand(64, 64, "bf16", 5), operand(64, 128, "bf16", 6)
    expected = a.float() @ b.float()
    for schedule in schedules:
        with emulate(schedule):
            try:
                frags = selftest.wgmma_tile(
                    "bf16", False, trans_b, *stored(a, b, False, trans_b), mutation
                )
            except RuntimeError as error:  # a copy left in flight is an error too
                assert "in flight" in str(error)
                continue
        got = tile_from_fragments(frags)
        assert not torch.allclose(got, expected, equal_nan=False), (mutation, schedule)


def test_the_leading_offset_is_unused_when_one_block_holds_the_operand():
    """K-major B never reads LBO under a swizzle: the same 'leading' mutation changes nothing."""
    a, b = operand(64, 64, "bf16", 7), operand(64, 128, "bf16", 8)
    with emulate("reverse"):
        frags = selftest.wgmma_tile("bf16", False, False, *stored(a, b, False, False), "leading")
    torch.testing.assert_close(tile_from_fragments(frags), a.float() @ b.float(), rtol=0, atol=0)


def test_wgmma_without_a_fence_is_an_error():
    a, b = operand(64, 64, "bf16", 9), operand(64, 128, "bf16", 10)
    with emulate(), pytest.raises(RuntimeError, match="without a wgmma.fence") as error:
        selftest.wgmma_tile("bf16", False, False, *stored(a, b, False, False), "no_fence")
    assert "wgmma_tile_kernel" in str(error.value)


# ---- the tensor copy engine


def expected_box(dims, box, coords):
    """The box at coords of a tensor holding 1, 2, 3, ... (row-major, dims innermost first),
    zeros outside it, in row-major box order."""
    out = []
    for index in range(torch.tensor(box).prod().item()):
        rest, inside, flat, scale = index, True, 0, 1
        for size, b, c in zip(dims, box, coords, strict=True):
            x = c + rest % b
            rest //= b
            inside = inside and 0 <= x < size
            flat += x * scale
            scale *= size
        out.append(flat + 1 if inside else 0)
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "dims,box,coords",
    [
        ((64, 100), (64, 64), (0, 0)),
        ((64, 100), (64, 64), (0, 64)),  # rows 100.. are outside: zeros
        ((96, 30), (64, 64), (64, -8)),  # columns 96.. and rows < 0 too
        ((64, 40, 3), (64, 64, 1), (0, 0, 2)),  # a 3D map keeps each matrix's end
    ],
)
def test_tensor_copies_zero_fill_and_swizzle_as_cutes_128b_atom(dims, box, coords, schedule):
    """Shared memory holds element (r, c) of the box at the 128B-swizzle atom's offset: CuTe's
    Layout_K_SW128_Atom for 16-bit types, Swizzle<3, 3, 3> o (8, 64) : (64, 1), tiled down the
    rows (the same pattern as the atom of Swizzle<3, 4, 3> on byte addresses)."""
    with emulate(schedule):
        raw = selftest.tensor_copy(list(dims), list(box), list(coords))
    rows = len(raw) // 64
    atom = layout((8, 64), (64, 1))
    swz = swizzle(3, 3, 3)
    want = expected_box(dims, box, coords)
    for r in range(rows):
        for c in range(64):
            # Column-major coordinate within the atom, atoms stacked every 512 elements.
            place = swz(atom(r % 8 + 8 * c)) + 512 * (r // 8)
            assert raw[place] == want[r * 64 + c], (r, c)


@pytest.mark.parametrize(
    "dims,box,message",
    [
        ((64, 100), (32, 64), "an inner box narrower than the swizzle span"),
        ((64, 100), (64, 300), r"box dimension 1 \(300\) is outside \[1, 256\]"),
        ((68, 100), (64, 64), "stride 1 .* must be a multiple of 16"),
    ],
)
def test_tensor_map_encoding_checks_what_the_driver_checks(dims, box, message):
    with emulate(), pytest.raises(ValueError, match=message):
        selftest.tensor_copy(list(dims), list(box), [0] * len(dims))


# ---- mbarriers and the rest


@pytest.mark.parametrize("arrivals", [1, 3, 32])
@pytest.mark.parametrize("schedule", SCHEDULES + ("random",))
def test_mbarrier_phases_complete_after_their_arrivals(arrivals, schedule):
    with emulate(schedule, seed=3):
        seen = selftest.mbarrier_phases(arrivals, False)
    assert seen[:3] == [10, 20, 30]


def test_a_wait_for_a_phase_that_never_completes_is_a_deadlock():
    with (
        emulate(),
        pytest.raises(RuntimeError, match="deadlock .*mbarrier_phases_kernel.*mbarriers"),
    ):
        selftest.mbarrier_phases(2, True)


@pytest.mark.parametrize(
    "misuse,threads,message",
    [
        (1, 32, "mbarrier.arrive on the mbarrier at shared address 0x0, which was never initial"),
        (2, 32, "parity must be 0 or 1"),
        (3, 128, r"setmaxnreg.inc: the register count must be a multiple of 8 in \[24, 256\]"),
        (4, 128, "wgmma operations of warp 0 still in flight"),
        (4, 96, "do not make a whole warpgroup of 128"),
    ],
)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_hopper_misuse_is_an_error_naming_the_kernel(misuse, threads, message, schedule):
    with emulate(schedule), pytest.raises(RuntimeError, match=message) as error:
        selftest.hopper_misuse(misuse, threads)
    assert "hopper_misuse_kernel" in str(error.value)


@pytest.mark.parametrize("schedule", SCHEDULES + ("random",))
def test_elect_picks_one_lane(schedule):
    with emulate(schedule, seed=5):
        selftest.hopper_misuse(5, 64)  # fails inside if not exactly one lane per warp
