"""Expert-parallel dispatch and combine (SPEC.md section 5) on 2 and 4 Gloo ranks, against a
reference built on ``torch.distributed.all_to_all_single``: rows, counts and both gradients,
over uniform, skewed and empty loads; the NCCL transport's life cycle where it can run; and the
errors every rank must raise alike."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels.dispatch import ExpertParallelDispatcher
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


def _check_dispatch(rank, world_size, num_experts, backend):
    dispatcher = ExpertParallelDispatcher(num_experts)
    local = slice(rank * num_experts // world_size, (rank + 1) * num_experts // world_size)
    checked = []
    for pattern in PATTERNS:
        for dtype in (torch.float32, torch.bfloat16):
            x, ids = routing(pattern, rank, world_size, num_experts)
            rows, _, counts = mk.permute(x.to(dtype), ids, num_experts)
            rows.requires_grad_()
            with backend_context(backend):
                expert_rows, plan = dispatcher.dispatch(rows, counts)
                want_rows, want_counts = ref.ep_dispatch(rows.detach(), counts)
                assert torch.equal(expert_rows, want_rows), (pattern, dtype)
                assert torch.equal(plan.tokens_per_expert, want_counts)
                group_counts = counts.clone()
                dist.all_reduce(group_counts)
                assert torch.equal(plan.group_tokens_per_expert, group_counts)
                assert torch.equal(plan.tokens_per_expert, group_counts[local])

                # Backward of dispatch = combine of the gradient.
                grad = torch.randn(expert_rows.shape).to(dtype)
                (expert_rows * grad).sum().backward()
                assert torch.equal(rows.grad, ref.ep_combine(grad, counts, rows.shape[0]))

                # Combine is the exact inverse, and its backward is dispatch of the gradient.
                outputs = expert_rows.detach().requires_grad_()
                back = dispatcher.combine(outputs, plan)
                assert torch.equal(back, rows.detach())
                grad_back = torch.randn(back.shape).to(dtype)
                (back * grad_back).sum().backward()
                assert torch.equal(outputs.grad, ref.ep_dispatch(grad_back, counts)[0])
            checked.append((pattern, dtype, int(counts.sum()), int(plan.tokens_per_expert.sum())))
    return checked


@pytest.mark.parametrize(
    "world_size,num_experts,backend",
    [(2, 8, "cpu"), (4, 4, "cpu"), (4, 12, "cpu"), (2, 6, "emu-forward"), (4, 8, "emu-reverse")],
)
def test_dispatch_and_combine_match_all_to_all_single(tmp_path, world_size, num_experts, backend):
    """E/P = 1, 2, 3, 4 experts per rank; the transposes of the rows on the native CPU op and
    on the CUDA kernel run by the emulator."""
    checked = run_on_ranks(_check_dispatch, world_size, tmp_path, num_experts, backend)
    # Every pattern ran on every rank, and the empty ones were empty where they should be.
    assert all(len(rank) == 2 * len(PATTERNS) for rank in checked)
    sent = {(p, r): n for r, rank in enumerate(checked) for p, _, n, _ in rank}
    assert sent[("empty_rank", 1)] == 0
    received = {(p, r): n for r, rank in enumerate(checked) for p, _, _, n in rank}
    assert all(received[("skewed", r)] == 0 for r in range(1, world_size))
