"""The CPU emulator of the CUDA execution model proves each of its features with a kernel of its
own (csrc/emu/selftest.cpp): indices, schedules, barriers, shared memory, atomics, every warp
collective, and the errors a broken kernel must raise instead of hanging."""

import itertools

import pytest
import torch

from moe_kernels import _C
from moe_kernels.emulator import SCHEDULES, emulate

selftest = _C.emulator_selftest


def where_am_i(grid, block):
    out = torch.tensor(selftest.where_am_i(list(grid), list(block))).view(-1, 10)
    return out[:, 0], out[:, 1:]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_thread_runs_once_with_its_indices(schedule):
    grid, block = (3, 2, 1), (4, 2, 2)
    with emulate(schedule, seed=1):
        _, where = where_am_i(grid, block)
    expected = [
        [bx, by, bz, tx, ty, tz, block[0], grid[0], grid[1]]
        for bz, by, bx in itertools.product(range(grid[2]), range(grid[1]), range(grid[0]))
        for tz, ty, tx in itertools.product(range(block[2]), range(block[1]), range(block[0]))
    ]
    assert where.tolist() == expected


def test_schedules_order_threads_between_barriers():
    def order(schedule, seed=0):
        with emulate(schedule, seed=seed):
            ran_at, _ = where_am_i((2, 1, 1), (64, 1, 1))
        return ran_at.view(2, 64) - ran_at.view(2, 64).min(dim=1, keepdim=True).values

    assert order("forward").tolist() == [list(range(64))] * 2
    assert order("reverse").tolist() == [list(range(63, -1, -1))] * 2
    random = order("random", seed=5)
    assert sorted(random[0].tolist()) == list(range(64))
    assert random[0].tolist() not in (list(range(64)), list(range(63, -1, -1)))
    assert random[0].tolist() != random[1].tolist()  # each block its own order
    assert torch.equal(order("random", seed=5), random)  # reproducible from the seed
    assert not torch.equal(order("random", seed=6), random)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barriers_make_a_shared_memory_reduction_correct(schedule):
    values = torch.randint(-1000, 1000, (3 * 256,), generator=torch.Generator().manual_seed(0))
    with emulate(schedule, seed=2):
        got = selftest.block_sum(values.float().tolist(), True)
    assert got == values.view(3, 256).sum(dim=1).float().tolist()


def test_a_missing_barrier_is_caught_by_the_schedules():
    values = [float(v) for v in range(256)]
    results = {}
    for schedule in SCHEDULES:
        with emulate(schedule, seed=3):
            results[schedule] = selftest.block_sum(values, False)
    # One order may hide the race (here "reverse" happens to sum correctly); two never agree.
    assert len({str(r) for r in results.values()}) > 1
    assert sum(r != [sum(values)] for r in results.values()) >= 2


def test_a_race_across_warps_shows_even_past_warp_collectives():
    # A warp runs alone from one block barrier to the next, so the reader's warp can run before
    # the writer's although both pass a warp collective between the write and the read.
    seen = {}
    for schedule in ("forward", "reverse"):
        with emulate(schedule):
            seen[schedule] = selftest.race_across_warps()
    assert seen == {"forward": 42, "reverse": -1}  # -1: the poison the reader found


def test_divergent_syncthreads_is_an_error_naming_the_kernel():
    with emulate(), pytest.raises(RuntimeError, match="divergent __syncthreads.*divergent_barrier"):
        selftest.divergent_barrier(5)
    with emulate():
        selftest.divergent_barrier(0)  # no thread exits: the barrier opens


def test_a_collective_that_lanes_never_reach_is_a_deadlock_error():
    with emulate(), pytest.raises(RuntimeError, match="deadlock.*__shfl_sync.*lanes 0x1f"):
        selftest.divergent_shuffle(5)


def test_shuffle_from_a_lane_outside_the_mask_is_an_error():
    with emulate(), pytest.raises(RuntimeError, match="lane 0 of warp 0 reads lane 20"):
        selftest.shuffle_outside_mask(20)
    with emulate():
        selftest.shuffle_outside_mask(7)


def expected_warp_ops(values, param, width):
    """Each collective, written from the CUDA programming guide, per warp of 32 lanes."""
    n = len(values)
    rows = [[0] * n for _ in range(10)]
    for t in range(n):
        warp, lane = divmod(t, 32)
        lanes = min(32, n - warp * 32)
        mine = [values[warp * 32 + i] for i in range(lanes)]
        base = lane - lane % width
        up = lane - param if lane - base >= param else lane
        down = lane + param if lane - base + param < width else lane
        xor = lane ^ param if (lane ^ param) < base + width else lane
        rows[0][t] = mine[base + param % width]
        rows[1][t] = mine[up]
        rows[2][t] = mine[down]
        rows[3][t] = mine[xor]
        rows[4][t] = sum(1 << i for i in range(lanes) if mine[i] % 3 == 0)
        rows[5][t] = int(any(v > param for v in mine))
        rows[6][t] = int(all(v > param for v in mine))
        rows[7][t] = sum(1 << i for i in range(lanes) if mine[i] % 4 == mine[lane] % 4)
        rows[8][t] = (1 << lanes) - 1
        rows[9][t] = int((mine[lane ^ 1] + 0.5) * 2)
    return rows


@pytest.mark.parametrize(
    "num_threads,param,width", [(64, 3, 32), (64, 17, 32), (64, 3, 8), (40, 5, 8), (64, 0, 1)]
)
@pytest.mark.parametrize("schedule", ["forward", "random"])
def test_warp_collectives(num_threads, param, width, schedule):
    g = torch.Generator().manual_seed(num_threads + param)
    values = torch.randint(0, 50, (num_threads,), generator=g).tolist()
    with emulate(schedule, seed=4):
        got = torch.tensor(selftest.warp_ops(values, param, width)).view(10, num_threads)
    assert got.tolist() == expected_warp_ops(values, param, width)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory_is_poisoned_at_every_block_start(schedule):
    with emulate(schedule):
        seen = selftest.shared_poison(3)
    # Static and dynamic shared memory read before any write, in each of 3 blocks: always the
    # poison (0xffffffff), never the 7s and 9s the previous block left.
    assert set(seen) == {0xFFFFFFFF} and len(seen) == 3 * 2 * 64


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_atomics_on_shared_and_global_memory(schedule):
    with emulate(schedule, seed=7):
        total, maximum = selftest.atomics(5, 96)
    assert total == 5 * sum(range(1, 97))
    assert maximum == 5 * 96 - 1


@pytest.mark.parametrize(
    "grid,block,shared,message",
    [
        ((0, 1, 1), (32, 1, 1), 0, "not a valid CUDA grid"),
        ((1, 1, 1), (1025, 1, 1), 0, "not a valid CUDA block"),
        ((1, 1, 1), (32, 1, 65), 0, "not a valid CUDA block"),
        ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, "dynamic shared memory exceed"),
    ],
)
def test_invalid_launches_are_errors(grid, block, shared, message):
    with emulate(), pytest.raises(RuntimeError, match=message):
        selftest.launch_config(list(grid), list(block), shared)


def test_an_error_leaves_the_emulator_ready_for_the_next_launch():
    with emulate(), pytest.raises(RuntimeError):
        selftest.divergent_barrier(1)
    with emulate():
        assert selftest.atomics(1, 32) == [sum(range(1, 33)), 31]


def test_emulate_restores_the_previous_setting():
    assert _C.emulation()[0] is False
    with emulate("reverse", seed=9):
        assert _C.emulation() == (True, "reverse", 9)
        with emulate("random", seed=1):
            assert _C.emulation() == (True, "random", 1)
        assert _C.emulation() == (True, "reverse", 9)
    assert _C.emulation()[0] is False
    with pytest.raises(RuntimeError, match="schedule must be one of"), emulate("sideways"):
        pass
