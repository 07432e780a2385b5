"""Data x expert parallelism for models built of ``MoELayer``s: the process groups, gradient
averaging, gradient clipping over sharded experts, and gathering the experts for export.

W ranks (``torch.distributed``'s world) are cut into W / P expert-parallel groups of P
consecutive ranks. Within a group each rank holds E/P experts of every MoE layer and the
groups exchange tokens by all-to-all, so the experts of a group see the tokens of P ranks at
once: ``ep_data_parallel = P`` and the computation batch is micro_batch x P sequences (arXiv
2408.15664 §4.1). Everything else (attention, router, loss-free bias, shared experts) is
replicated on all W ranks, as are the experts across the W / P groups (ranks r, r + P, ...
hold the same experts: the expert-data-parallel group).
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .experts import SwiGLUExperts


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits. Groups are None in a single process."""

    world_size: int = 1
    rank: int = 0
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    expert_data_group: dist.ProcessGroup | None = None
    # What the dispatchers' transport "auto" becomes: the loop that owns every collective of
    # the step chooses "nccl" when it has made the group's NCCL transport.
    ep_transport: str = "process_group"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def ep_data_parallel(self) -> int:
        """Ranks whose tokens one expert sees in one forward: the computation batch is
        micro_batch x this many sequences."""
        return self.ep_size


def init_expert_parallel(ep_size: int, timeout: datetime.timedelta | None = None) -> ParallelLayout:
    """Creates the expert-parallel groups of ``ep_size`` consecutive ranks and the
    expert-data-parallel groups across them (collective: every rank calls it alike), whose
    collectives give up after ``timeout`` (torch's default for new groups when None, which is
    not the default group's). Without an initialised default group, the single-process
    layout."""
    if not dist.is_initialized():
        if ep_size != 1:
            raise ValueError(
                f"ep_size={ep_size} needs torch.distributed (launch with torchrun "
                f"--nproc_per_node={ep_size})"
            )
        return ParallelLayout()
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of ranks {world}")
    ep_group = expert_data_group = None
    # new_group is collective over the world: every rank creates every group, in one order.
    for first in range(0, world, ep_size):
        group = dist.new_group(list(range(first, first + ep_size)), timeout=timeout)
        if first <= rank < first + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world, ep_size)), timeout=timeout)
        if rank % ep_size == offset:
            expert_data_group = group
    return ParallelLayout(world, rank, ep_size, ep_group, expert_data_group)


def expert_modules(model: nn.Module) -> list[SwiGLUExperts]:
    return [m for m in model.modules() if isinstance(m, SwiGLUExperts) and m.sharded]


def is_sharded_expert(parameter: nn.Parameter, model: nn.Module) -> bool:
    return any(parameter is p for m in expert_modules(model) for p in m.parameters())


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, sharded expert) parameters of ``model``."""
    sharded = {id(p) for m in expert_modules(model) for p in m.parameters()}
    replicated = [p for p in model.parameters() if id(p) not in sharded]
    experts = [p for p in model.parameters() if id(p) in sharded]
    return replicated, experts


def _all_reduce_sum(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sums ``tensors`` over ``group`` in one flat collective."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for tensor, summed in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        tensor.copy_(summed)


@torch.no_grad()
def average_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """Makes every gradient that of the mean loss over all W ranks' batches (call after the
    backward passes of a step, before clipping and the optimizer step).

    Replicated parameters: the mean over the W ranks. Sharded experts already hold the sum of
    the gradients from the P ranks of their group (combine's backward brought them); they add
    those of the other W / P groups and divide by W."""
    if not layout.distributed:
        return
    replicated, experts = split_parameters(model)
    grads = [p.grad for p in replicated if p.grad is not None]
    _all_reduce_sum(grads, None)
    expert_grads = [p.grad for p in experts if p.grad is not None]
    if layout.world_size > layout.ep_size:
        _all_reduce_sum(expert_grads, layout.expert_data_group)
    for grad in grads + expert_grads:
        grad.div_(layout.world_size)


def _sum_of_squares(params: list[nn.Parameter]) -> Tensor:
    """The squared L2 norm of the gradients of ``params``, in fp64."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None:
            total += p.grad.double().square().sum()
    return total


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model when its experts are sharded:
    the norm counts each replicated gradient once and every expert once."""
    replicated, experts = split_parameters(model)
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    replicated_square, expert_square = (_sum_of_squares(params) for params in (replicated, experts))
    dist.all_reduce(expert_square, group=layout.ep_group)
    total = (replicated_square + expert_square).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total.float()


@torch.no_grad()
def consolidated_state_dict(model: nn.Module, layout: ParallelLayout) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded expert weight gathered over its
    expert-parallel group into the [E, ...] tensor of the unsharded model (collective over the
    group). Loads into the same model built without expert parallelism."""
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if not expert_modules(model):
        return state
    for module_name, module in model.named_modules():
        if not (isinstance(module, SwiGLUExperts) and module.sharded):
            continue
        for name, weight in module.named_parameters():
            shards = [torch.empty_like(weight) for _ in range(layout.ep_size)]
            dist.all_gather(shards, weight.detach().contiguous(), group=layout.ep_group)
            state[f"{module_name}.{name}"] = torch.cat(shards).cpu()
    return state


def local_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The inverse of ``consolidated_state_dict``: the unsharded model's ``state`` with every
    [E, ...] expert weight cut to the experts ``model`` holds here, to load into it."""
    local = dict(state)
    for module_name, module in model.named_modules():
        if not (isinstance(module, SwiGLUExperts) and module.sharded):
            continue
        held = slice(module.first_expert, module.first_expert + module.num_local_experts)
        for name, _ in module.named_parameters():
            local[f"{module_name}.{name}"] = state[f"{module_name}.{name}"][held]
    return local


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a number over every rank (the number itself in one process)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


__all__ = [
    "ParallelLayout",
    "average_gradients",
    "clip_grad_norm_",
    "consolidated_state_dict",
    "init_expert_parallel",
    "is_sharded_expert",
    "local_state_dict",
    "mean_over_ranks",
    "split_parameters",
]
