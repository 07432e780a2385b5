"""transpose_segments against the reference (SPEC.md section 5), and its gradient.

Every op test runs on each backend (``device``): inputs are built on the CPU, moved to the
backend's device, and the results compared on the CPU with the reference. The op is a copy, so
every comparison is bit exact.
"""

import pytest
import torch

import moe_kernels as mk
from conftest import on_backends
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GRIDS = [(1, 1), (1, 5), (4, 1), (2, 3), (8, 16), (64, 64)]


def hidden_states(num_rows, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, hidden, generator=g).to(dtype)


def segment_counts(grid, kind, seed=0):
    """[A, B] int64 counts: "uniform" (3 rows each), "random" (0-4 rows, many empty),
    "all_zero", "one_segment" (37 rows in one segment, none elsewhere) or "large" (a few
    thousand rows in all)."""
    g = torch.Generator().manual_seed(seed)
    num_a, num_b = grid
    if kind == "uniform":
        return torch.full(grid, 3)
    if kind == "random":
        return torch.randint(0, 5, grid, generator=g)
    if kind == "all_zero":
        return torch.zeros(grid, dtype=torch.long)
    if kind == "one_segment":
        counts = torch.zeros(grid, dtype=torch.long)
        counts[num_a // 2, num_b - 1] = 37
        return counts
    assert kind == "large"
    return torch.randint(0, max(2, 6000 // (num_a * num_b)), grid, generator=g)


def assert_matches_reference(device, rows, counts):
    got = mk.transpose_segments(rows.to(device), counts.to(device))
    assert got.device.type == device and got.dtype == rows.dtype and got.shape == rows.shape
    assert torch.equal(got.cpu(), ref.transpose_segments(rows, counts))
    return got


@on_backends("transpose_segments")
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["uniform", "random", "all_zero", "one_segment", "large"])
def test_matches_reference(device, grid, kind):
    counts = segment_counts(grid, kind)
    assert_matches_reference(device, hidden_states(int(counts.sum()), 7), counts)


@on_backends("transpose_segments")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 64, 256])
def test_dtypes_and_hidden_sizes(device, dtype, hidden):
    # 7 rows of an odd width take the element-by-element path; 64 and 256 the 16-byte packs.
    counts = segment_counts((8, 16), "random")
    assert_matches_reference(device, hidden_states(int(counts.sum()), hidden, dtype), counts)


@on_backends("transpose_segments")
def test_accepts_int32_counts(device):
    counts = segment_counts((4, 6), "random")
    assert_matches_reference(device, hidden_states(int(counts.sum()), 16), counts.int())


@on_backends("transpose_segments")
@pytest.mark.parametrize("grid", [(2, 3), (64, 64)])
def test_round_trip_is_identity(device, grid):
    counts = segment_counts(grid, "random", seed=1).to(device)
    x = hidden_states(int(counts.sum()), 12).to(device)
    there = mk.transpose_segments(x, counts)
    assert torch.equal(mk.transpose_segments(there, counts.t()), x)


@on_backends("transpose_segments")
def test_each_segment_keeps_its_rows_in_order(device):
    x = torch.arange(10.0).unsqueeze(1)
    counts = torch.tensor([[1, 2, 0], [3, 0, 4]])
    got = mk.transpose_segments(x.to(device), counts.to(device))
    # (0,0) (1,0) (0,1) (1,1) (0,2) (1,2)
    assert got.flatten().tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8, 9]


@on_backends("transpose_segments")
@pytest.mark.parametrize("num_rows,hidden,grid", [(0, 8, (3, 4)), (5, 0, (2, 2)), (0, 4, (0, 3))])
def test_empty_shapes(device, num_rows, hidden, grid):
    counts = torch.zeros(grid, dtype=torch.long)
    if num_rows:
        counts[1, 0] = num_rows
    assert_matches_reference(device, hidden_states(num_rows, hidden), counts)


@on_backends("transpose_segments")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_and_non_contiguous_rows(device, dtype):
    counts = segment_counts((3, 5), "random", seed=2)
    num_rows = int(counts.sum())
    # A view one element into its storage is off a 16-byte boundary; a transposed one is not
    # contiguous. Both are copied as they read.
    storage = hidden_states(num_rows * 64 + 1, 1, dtype).flatten()
    assert_matches_reference(device, storage[1:].view(num_rows, 64), counts)
    assert_matches_reference(device, hidden_states(64, num_rows, dtype).t(), counts)


@on_backends("transpose_segments")
def test_gradient_matches_reference(device):
    counts = segment_counts((4, 6), "random", seed=3)
    x = hidden_states(int(counts.sum()), 10)
    scale = hidden_states(x.shape[0], 10, seed=4)

    def loss(impl, x, counts, scale):
        return (impl.transpose_segments(x, counts) * scale).sum()

    x_dev = x.to(device).requires_grad_()
    loss(mk, x_dev, counts.to(device), scale.to(device)).backward()
    x_ref = x.detach().clone().requires_grad_()
    loss(ref, x_ref, counts, scale).backward()
    assert torch.equal(x_dev.grad.cpu(), x_ref.grad)


@on_backends("transpose_segments")
def test_gradcheck_fp64(device):
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]], device=device)
    x = hidden_states(7, 3, torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mk.transpose_segments(x, counts), (x,))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_emulated_kernels_are_bit_identical_to_the_cpu(schedule):
    counts = segment_counts((64, 64), "random", seed=5)
    x = hidden_states(int(counts.sum()), 24, torch.bfloat16)
    want = mk.transpose_segments(x, counts)
    with emulate(schedule, seed=7):
        assert torch.equal(mk.transpose_segments(x, counts), want)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_cuda_clamps_unchecked_counts(schedule):
    # The CUDA op does not check the counts (that would synchronise with the GPU): a negative
    # count is 0, and an output row with no source row inside `rows` is zero.
    x = torch.arange(1.0, 7.0).unsqueeze(1)
    with emulate(schedule):
        short = mk.transpose_segments(x, torch.tensor([[1, 2], [-5, 1]]))  # 4 of 6 rows
        long = mk.transpose_segments(x, torch.tensor([[3, 2], [2, 4]]))  # 11 rows, not 6
    # Output order (0,0) (1,0) (0,1) (1,1): rows [1], [], [2, 3], [4]; then nothing.
    assert short.flatten().tolist() == [1, 2, 3, 4, 0, 0]
    # (0,0) = rows 1-3, (1,0) = rows 6-7 (7 is past the input: zero).
    assert long.flatten().tolist() == [1, 2, 3, 6, 0, 4]
