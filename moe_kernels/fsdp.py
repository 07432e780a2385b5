"""FSDP2 over the data x expert-parallel layout: a model of ``MoELayer``s sharded with
``torch.distributed.fsdp.fully_shard`` on a two-dimensional ``DeviceMesh``.

The mesh has W / P rows ("dp") of P consecutive ranks ("ep"), the expert-parallel groups of
``moe_kernels.parallel``. Each ``SwiGLUExperts`` weight becomes a DTensor of all E experts,
sharded over "ep" (the P ranks of a group hold E/P experts each, as the dispatch expects), and
FSDP2 shards it further over "dp", the ranks that hold the same experts; its checkpoints then
hold the [E, ...] weight, whatever the layout that wrote them. Every other parameter
(attention, norms, embeddings, router, shared experts) is sharded by FSDP2 over all W ranks.
The loss-free bias and the counts are buffers, replicated and all-reduced as without FSDP.

Gradients: FSDP2 averages each gradient over the ranks of its mesh. A dense gradient is then
that of the mean loss over the W ranks' batches. An expert's gradient already sums the P ranks
of its group (the combine's backward brought their rows back), so the average over the W / P
replicas is P times the mean's: ``finish_gradients`` divides it by P (after the reduction:
FSDP2's own divide factor needs a pre-multiplied sum, which Gloo lacks).

    mesh = fsdp_mesh(layout, "cuda")
    shard_model(model, mesh, blocks=model.blocks, param_dtype=torch.bfloat16)
    ...backward of every micro-batch...
    finish_gradients(model, layout)
    clip_grad_norm_(model, 1.0)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from .experts import SwiGLUExperts
from .parallel import ParallelLayout
from .router import Router


def fsdp_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    """The ("dp", "ep") mesh of ``layout``: W / P rows of P consecutive ranks, so "ep" groups
    the ranks of ``layout.ep_group`` and "dp" those of ``layout.expert_data_group``."""
    return init_device_mesh(
        device_type,
        (layout.world_size // layout.ep_size, layout.ep_size),
        mesh_dim_names=("dp", "ep"),
    )


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    blocks: Iterable[nn.Module] = (),
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shards ``model`` in place with FSDP2 on ``mesh`` (``fsdp_mesh``): every
    ``SwiGLUExperts`` over "ep" then "dp"; each of ``blocks`` (a transformer's layers: one
    all-gather per block) and the rest of the model over all ranks. With ``param_dtype``
    (mixed precision), parameters are gathered and computed in that dtype and gradients
    reduced in fp32, except the routers', which stay fp32 (the routing scores and the bias
    they are compared with are fp32). Returns ``model``."""
    everywhere = mesh._flatten("dp_ep") if mesh.size() > 1 else mesh
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, SwiGLUExperts):
            if mesh["ep"].size() > 1:
                for name, weight in list(module.named_parameters(recurse=False)):
                    whole = DTensor.from_local(weight.data, mesh["ep"], [Shard(0)], run_check=False)
                    setattr(module, name, nn.Parameter(whole))
            fully_shard(module, mesh=mesh["dp"], mp_policy=policy)
        elif isinstance(module, Router) and param_dtype is not None:
            fully_shard(module, mesh=everywhere, mp_policy=fp32)
            # The layer computes the logits through this method, not the router's forward.
            register_fsdp_forward_method(module, "logits")
    for block in blocks:
        fully_shard(block, mesh=everywhere, mp_policy=policy)
    return fully_shard(model, mesh=everywhere, mp_policy=policy)


@torch.no_grad()
def finish_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """Makes the experts' gradients those of the mean loss over the W ranks (call after the
    step's backward passes, before clipping): FSDP2's average over the W / P replicas is P
    times it."""
    if layout.ep_size == 1:
        return
    for module in model.modules():
        if isinstance(module, SwiGLUExperts):
            for weight in module.parameters():
                if weight.grad is not None:
                    weight.grad.div_(layout.ep_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of a sharded model: every element of every gradient
    lives on exactly one rank, so the squared norm is the sum over the ranks of their shards'
    (one all-reduce, in fp64)."""
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        square += grad.double().square().sum()
    if dist.is_initialized():
        dist.all_reduce(square)
    total = square.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total.float()


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every DTensor gathered whole onto the CPU (collective: every
    rank calls it): the unsharded model's state, [E, ...] experts included."""
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in model.state_dict().items()
    }
