"""``patch`` and ``unpatch``: swap transformers' MoE routers and experts onto the fused ops.

Each supported sparse-MoE block keeps its own ``forward`` (shared experts, their gates, jitter
and reshapes stay the model's code); its router and its experts module are switched, in place,
to subclasses of their classes whose ``forward`` runs ``biased_topk`` and permute -> grouped
GEMMs -> unpermute (as ``torch.nn.utils.parametrize`` switches a module's class). Parameters,
buffers, hooks and ``state_dict`` keys are the module's own, untouched; output-capturing hooks
(``output_router_logits``) still match, the router keeping its class by inheritance.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ... import ops
from ..._arguments import check_number
from .blocks import FusedBlock, KeepsBiasFp32, block_to_fuse
from .experts import FusedExperts, experts_recipe
from .families import family_note
from .padding import thread_attention_mask
from .routing import (
    SCORE_FUNCTIONS,
    SCORE_MODULES,
    FusedRouter,
    Routing,
    score_function,
    supported_routers,
)

BALANCING = (None, "loss_free")

_fused_classes: dict[tuple[type, type], type] = {}
# The model attribute holding the hooks that thread its attention mask to the routers.
_MASK_HOOKS = "moe_attention_mask_hooks"


def patch(
    model: nn.Module,
    balancing: str | None = None,
    rate: float = 1e-3,
    *,
    center_bias: bool = False,
    backend: str = "auto",
) -> int:
    """Runs every supported sparse-MoE block of ``model`` on this package's ops, in place.

    A block is a module with an ``experts`` child; it is patched when its router class is one
    of ``routing.ROUTERS`` (with the code its recipe computes) and its experts are SwiGLU
    experts in transformers' stacked layout or have a recipe of their own
    (``experts.EXPERTS``), else left alone and named in a warning (never half-patched). A block
    whose own forward cannot run them (Llama 4's, DBRX's: ``blocks``) is switched too.

    Args:
        model: a transformers model (or any module holding such blocks).
        balancing: None (route as the model does, with its own ``e_score_correction_bias``
            where it has one) or "loss_free": the bias moves after each optimizer step
            (``update_balance``, or ``LossFreeBalancingCallback`` under ``Trainer``); a router
            without one gets a zero fp32 ``e_score_correction_bias`` buffer (saved in the
            ``state_dict``), and an existing one is kept fp32.
        rate: the loss-free update rate u (``bias += u * sign(mean - counts)``), >= 0.
        center_bias: subtract each update's mean, so the biases keep theirs (``ops.update_bias``'s
            ``centered``).
        backend: the grouped GEMM backend, one of ``ops.GROUPED_GEMM_BACKENDS`` (see
            ``ops.grouped_gemm``; "auto": the fastest path of the device).

    Returns:
        How many blocks were patched.
    """
    if balancing not in BALANCING:
        raise ValueError(f"balancing must be one of {BALANCING}, got {balancing!r}")
    check_number("rate", rate)
    if backend not in ops.GROUPED_GEMM_BACKENDS:
        raise ValueError(f"backend must be one of {ops.GROUPED_GEMM_BACKENDS}, got {backend!r}")
    fused = (FusedRouter, FusedExperts, FusedBlock, KeepsBiasFp32)
    if any(isinstance(module, fused) for module in model.modules()):
        raise ValueError("model is already patched: unpatch(model) first")
    routers = supported_routers()
    patched = 0
    for name, block in list(model.named_modules()):
        experts = block._modules.get("experts")
        if experts is None:
            continue
        router = next((child for child in block.children() if type(child) in routers), None)
        recipe = experts_recipe(experts)
        fuse_block = block_to_fuse(block)
        reason = (
            "its router is none of the routers moe_kernels expresses" + family_note(block)
            if router is None
            else _wrapped(router, "router")
            or _wrapped(experts, "experts")
            or _wrapped(block, "block")
            or (recipe if isinstance(recipe, str) else None)
            or (fuse_block if isinstance(fuse_block, str) else None)
            or _unknown_score_function(router, routers[type(router)])
        )
        if reason is not None:
            warnings.warn(
                f"moe_kernels: left {name or 'model'} ({type(block).__name__}) unpatched: {reason}",
                stacklevel=2,
            )
            continue
        _fuse_router(router, block, routers[type(router)], balancing, rate, center_bias)
        _switch_class(experts, FusedExperts)
        experts.moe_backend = backend
        experts.moe_recipe = recipe
        if fuse_block is not None:
            _switch_class(block, fuse_block)
        patched += 1
    if patched:
        model.__dict__[_MASK_HOOKS] = thread_attention_mask(model)
    return patched


def unpatch(model: nn.Module) -> int:
    """Restores every block ``patch`` changed to its original classes (a bias buffer ``patch``
    added is removed; a model's own bias stays, fp32). Returns how many blocks it restored."""
    for handle in model.__dict__.pop(_MASK_HOOKS, ()):
        handle.remove()
    restored = 0
    for module in model.modules():
        if isinstance(module, FusedRouter):
            del module._buffers["tokens_per_expert"]
            if module.__dict__.pop("moe_added_bias", False):
                del module._buffers[module.moe_routing.bias]
            for attribute in ("moe_balancing", "moe_rate", "moe_center_bias", "moe_block"):
                module.__dict__.pop(attribute, None)
            module.__class__ = module.__class__.__bases__[1]
            restored += 1
        elif isinstance(module, FusedExperts):
            module.__dict__.pop("moe_backend", None)
            module.__dict__.pop("moe_recipe", None)
            module.__class__ = module.__class__.__bases__[1]
        elif isinstance(module, (FusedBlock, KeepsBiasFp32)):
            module.__class__ = module.__class__.__bases__[1]
    return restored


def _fuse_router(
    router: nn.Module,
    block: nn.Module,
    routing: Routing,
    balancing: str | None,
    rate: float,
    center_bias: bool,
) -> None:
    _switch_class(router, FusedRouter, moe_routing=routing)
    # Not a submodule: the router reads what its block holds for it (the bias the block passes
    # it, to move it; DBRX's k).
    router.__dict__["moe_block"] = block
    device = router.router_weight.device
    router.register_buffer(
        "tokens_per_expert",
        torch.zeros(router.num_experts, dtype=torch.int64, device=device),
        persistent=False,
    )
    router.moe_balancing = balancing
    router.moe_rate = rate
    router.moe_center_bias = center_bias
    if balancing != "loss_free":
        return
    argument = routing.bias_argument
    if argument is not None and getattr(block, argument, None) is not None:
        _switch_class(block, KeepsBiasFp32, fp32_tensors=(argument,))
    bias = router.held_bias()
    if bias is None:
        router.register_buffer(routing.bias, torch.zeros(router.num_experts, device=device))
        router.moe_added_bias = True
    elif bias.dtype != torch.float32:
        bias.data = bias.data.float()  # in place: a Parameter (ERNIE's) stays the model's object


def _unknown_score_function(router: nn.Module, routing: Routing) -> str | None:
    if score_function(router, routing) is None:
        held = getattr(router, routing.score_fn, None)
        name = repr(held) if isinstance(held, str) else type(held).__name__
        known = [*SCORE_FUNCTIONS, *SCORE_MODULES]
        return f"its router's score function is {name}, none of {known}"
    return None


def _wrapped(module: nn.Module, role: str) -> str | None:
    # A forward set on the instance (accelerate's device-map hooks do this) would keep calling
    # the original class's forward: switching the class would change nothing.
    if "forward" in module.__dict__:
        return (
            f"its {role} module's forward is replaced on the instance "
            "(by hooks such as accelerate's)"
        )
    return None


def _switch_class(module: nn.Module, mixin: type, **attributes: object) -> None:
    original = type(module)
    fused = _fused_classes.get((mixin, original))
    if fused is None:
        fused = type(f"Fused{original.__name__}", (mixin, original), attributes)
        _fused_classes[(mixin, original)] = fused
    module.__class__ = fused
