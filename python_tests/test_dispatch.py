"""Expert-parallel dispatch and combine (SPEC.md section 5) on 2 and 4 Gloo ranks, against a
reference built on ``torch.distributed.all_to_all_single``: rows, counts and both gradients,
over uniform, skewed and empty loads; the NCCL transport's life cycle where it can run; and the
errors every rank must raise alike."""

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels.dispatch import ExpertParallelDispatcher, init_nccl, nccl_available
from moe_kernels.emulator import emulate

H = 12


def routing(pattern: str, rank: int, world_size: int, num_experts: int):
    """(hidden [T, H], ids [T, 2]) of one rank under a load pattern."""
    g = torch.Generator().manual_seed(100 * rank + len(pattern))
    num_tokens = {"uniform": 9 + 4 * rank, "skewed": 16, "empty_rank": 0 if rank == 1 else 11}
    num_tokens = num_tokens.get(pattern, 10)
    if pattern == "skewed":  # everything to the first rank's experts, mostly expert 0
        choices = torch.tensor([0] * 6 + list(range(num_experts // world_size)))
    elif pattern == "empty_experts":  # only every third expert receives rows
        choices = torch.arange(0, num_experts, 3)
    else:
        choices = torch.arange(num_experts)
    ids = choices[torch.randint(len(choices), (num_tokens, 2), generator=g)]
    return torch.randn(num_tokens, H, generator=g), ids


PATTERNS = ("uniform", "skewed", "empty_rank", "empty_experts")


def backend_context(backend: str):
    """The emulator for "emu-<schedule>" (the CUDA kernel of the row transposes), else none."""
    if backend.startswith("emu-"):
        return emulate(backend.removeprefix("emu-"))
    return contextlib.nullcontext()


def _check_dispatch(rank, world_size, num_experts, backend, transport="auto"):
    device = "cuda" if backend == "cuda" else "cpu"
    if transport == "nccl":
        init_nccl()
    local = slice(rank * num_experts // world_size, (rank + 1) * num_experts // world_size)
    checked = []
    for pattern, dtype, layout in itertools.product(
        PATTERNS, (torch.float32, torch.bfloat16), ("transpose", "grouped")
    ):
        dispatcher = ExpertParallelDispatcher(num_experts, transport=transport, layout=layout)
        x, ids = routing(pattern, rank, world_size, num_experts)
        rows, _, counts = mk.permute(x.to(device, dtype), ids.to(device), num_experts)
        rows.requires_grad_()
        with backend_context(backend):
            expert_rows, plan = dispatcher.dispatch(rows, counts)
            want_rows, want_counts = ref.ep_dispatch(rows.detach(), counts)
            assert torch.equal(expert_rows, want_rows), (pattern, dtype, layout)
            assert torch.equal(plan.tokens_per_expert, want_counts)
            group_counts = counts.clone()
            dist.all_reduce(group_counts)
            assert torch.equal(plan.group_tokens_per_expert, group_counts)
            assert torch.equal(plan.tokens_per_expert, group_counts[local])

            # Backward of dispatch = combine of the gradient.
            grad = torch.randn(expert_rows.shape).to(device, dtype)
            (expert_rows * grad).sum().backward()
            assert torch.equal(rows.grad, ref.ep_combine(grad, counts, rows.shape[0]))

            # Combine is the exact inverse, and its backward is dispatch of the gradient.
            outputs = expert_rows.detach().requires_grad_()
            back = dispatcher.combine(outputs, plan)
            assert torch.equal(back, rows.detach())
            grad_back = torch.randn(back.shape).to(device, dtype)
            (back * grad_back).sum().backward()
            assert torch.equal(outputs.grad, ref.ep_dispatch(grad_back, counts)[0])
        checked.append((pattern, dtype, int(counts.sum()), int(plan.tokens_per_expert.sum())))
    return checked


@pytest.mark.parametrize(
    "world_size,num_experts,backend",
    [(2, 8, "cpu"), (4, 4, "cpu"), (4, 12, "cpu"), (2, 6, "emu-forward"), (4, 8, "emu-reverse")],
)
@pytest.mark.slow
def test_dispatch_and_combine_match_all_to_all_single(tmp_path, world_size, num_experts, backend):
    """E/P = 1, 2, 3, 4 experts per rank, both layouts; the transposes of the rows on the native
    CPU op and on the CUDA kernel run by the emulator."""
    checked = run_on_ranks(_check_dispatch, world_size, tmp_path, num_experts, backend)
    # Every pattern ran on every rank, and the empty ones were empty where they should be.
    assert all(len(rank) == 4 * len(PATTERNS) for rank in checked)
    sent = {(p, r): n for r, rank in enumerate(checked) for p, _, n, _ in rank}
    assert sent[("empty_rank", 1)] == 0
    received = {(p, r): n for r, rank in enumerate(checked) for p, _, _, n in rank}
    assert all(received[("skewed", r)] == 0 for r in range(1, world_size))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("transport", ["process_group", "nccl"])
def test_dispatch_on_a_gpu(tmp_path, transport):
    """One rank per GPU over NCCL (with one GPU, the rank dispatches to itself), through the
    group's own all-to-all and through the direct NCCL transport."""
    if transport == "nccl" and not nccl_available():
        pytest.skip("this build has no NCCL transport")
    world_size = min(torch.cuda.device_count(), 4)
    run_on_ranks(
        _check_dispatch, world_size, tmp_path, 4 * world_size, "cuda", transport, backend="nccl"
    )


def _opcheck(rank, world_size):
    """The row movements against their schemas, fake kernels and autograd registrations."""
    dispatcher = ExpertParallelDispatcher(8)
    x, ids = routing("uniform", rank, world_size, 8)
    rows, _, counts = mk.permute(x, ids, 8)
    expert_rows, plan = dispatcher.dispatch(rows, counts)
    plan_args = (plan.recv_counts, plan.send_grid, plan.recv_grid, dispatcher.group_name)
    ops = torch.ops.moe_kernels
    torch.library.opcheck(ops.ep_dispatch_rows, (rows.requires_grad_(), *plan_args))
    torch.library.opcheck(ops.ep_combine_rows, (expert_rows.requires_grad_(), *plan_args))
    grouped = (*plan_args, "process_group", "grouped")
    torch.library.opcheck(ops.ep_dispatch_rows, (rows, *grouped))
    torch.library.opcheck(ops.ep_combine_rows, (expert_rows, *grouped))
    return True


def test_opcheck_of_the_collectives(tmp_path):
    assert all(run_on_ranks(_opcheck, 2, tmp_path))


def _dispatch_once(rank, world_size):
    dispatcher = ExpertParallelDispatcher(8)
    x, ids = routing("uniform", rank, world_size, 8)
    rows, _, counts = mk.permute(x, ids, 8)
    dispatcher.dispatch(rows, counts)
    return True


@pytest.mark.slow
def test_ranks_exit_cleanly_after_a_dispatch(tmp_path):
    """A finished all-to-all's work holds Python objects (its tensors, the thread's Python
    state). Destroyed on Gloo's worker thread at interpreter exit, it aborted about one rank
    process in three ("terminate called without an active exception"); the transport now has
    it destroyed on the calling thread. Several launches, since it is a race."""
    for attempt in range(6):
        (tmp_path / str(attempt)).mkdir()
        assert all(run_on_ranks(_dispatch_once, 2, tmp_path / str(attempt)))


def _errors(rank, world_size):
    """Each bad call raises on every rank alike (no rank is left waiting in a collective), and
    the group still works afterwards."""
    num_experts = 8
    x, ids = routing("uniform", rank, world_size, num_experts)
    rows, _, counts = mk.permute(x, ids, num_experts)
    dispatcher = ExpertParallelDispatcher(num_experts)
    raised = {}

    def expect(name, error, call):
        with pytest.raises(error) as info:
            call()
        raised[name] = str(info.value)

    expect("divisible", ValueError, lambda: ExpertParallelDispatcher(7))
    expect(
        "divisible_op",
        RuntimeError,
        lambda: torch.ops.moe_kernels.ep_plan(rows, counts[:7], dispatcher.group_name),
    )
    other_experts = 8 if rank == 0 else 16
    expect(
        "num_experts",
        ValueError,
        lambda: ExpertParallelDispatcher(other_experts).dispatch(
            *mk.permute(x, ids, other_experts)[::2]
        ),
    )
    hidden = x if rank == 0 else torch.cat([x, x], dim=1)
    expect("hidden", RuntimeError, lambda: dispatcher.dispatch(*mk.permute(hidden, ids, 8)[::2]))
    dtype = torch.float32 if rank == 0 else torch.bfloat16
    expect("dtype", RuntimeError, lambda: dispatcher.dispatch(rows.to(dtype), counts))
    fewer = rows if rank == 0 else rows[:-1]
    expect("rows", RuntimeError, lambda: dispatcher.dispatch(fewer, counts))
    negative = counts.clone()
    if rank == 0:
        negative[0], negative[1] = -1, negative[1] + negative[0] + 1
    expect("negative", RuntimeError, lambda: dispatcher.dispatch(rows, negative))
    expect(
        "splits",
        RuntimeError,
        lambda: torch.ops.moe_kernels.ep_dispatch_rows(
            rows, torch.zeros(world_size, 4, dtype=torch.int64), [rows.shape[0]], [0],
            dispatcher.group_name,
        ),
    )  # fmt: skip
    if not nccl_available():
        expect(
            "nccl", RuntimeError, lambda: ExpertParallelDispatcher(8, transport="nccl").dispatch(rows, counts)
        )  # fmt: skip
    expect("transport", ValueError, lambda: ExpertParallelDispatcher(8, transport="mpi"))
    expect("layout", ValueError, lambda: ExpertParallelDispatcher(8, layout="scatter"))
    _, plan = dispatcher.dispatch(rows, counts)
    expect(
        "layout_op",
        RuntimeError,
        lambda: torch.ops.moe_kernels.ep_dispatch_rows(
            rows, plan.recv_counts, plan.send_grid, plan.recv_grid, dispatcher.group_name,
            "process_group", "scatter",
        ),
    )  # fmt: skip
    expect(
        "expert_choice",
        ValueError,
        lambda: mk.MoELayer(12, 8, 8, 2, balancing="expert_choice", ep_group=dist.group.WORLD),
    )
    expert_rows, plan = dispatcher.dispatch(rows, counts)  # the group still works
    assert torch.equal(dispatcher.combine(expert_rows, plan), rows)
    return raised


def test_bad_calls_raise_on_every_rank(tmp_path):
    ranks = run_on_ranks(_errors, 2, tmp_path)
    for raised in ranks:
        assert (
            "num_experts=7 must be divisible by the expert-parallel group size 2"
            in raised["divisible"]
        )
        assert "must be divisible by the expert-parallel group size 2" in raised["divisible_op"]
        assert "disagree on num_experts: [8, 16]" in raised["num_experts"]
        assert "rank 1 has num_experts=8, hidden size 24" in raised["hidden"]
        assert "rank 1 has num_experts=8, hidden size 12, dtype BFloat16" in raised["dtype"]
        assert "rows.size(0) must equal tokens_per_expert.sum(), rank 1" in raised["rows"]
        assert (
            "tokens_per_expert must be >= 0, rank 0 has -1 rows for expert 0" in raised["negative"]
        )
        assert (
            "send_grid must have one entry per (rank, local expert) of the group (8)"
            in raised["splits"]
        )
        assert "layout must be one of" in raised["layout"]
        assert "layout must be 'transpose' or 'grouped', got 'scatter'" in raised["layout_op"]
        assert "no NCCL" in raised.get("nccl", "no NCCL")
        assert "transport must be one of" in raised["transport"]
        assert "does not support expert parallelism" in raised["expert_choice"]


def test_the_dispatcher_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelDispatcher(8)
