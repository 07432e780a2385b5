"""The attention mask a patched model receives, threaded to its routers, so that the loss-free
counts take only real tokens: padding is routed as the model routes it, but not counted.

transformers' MoE blocks never see the mask, and their models are not changed: ``patch`` puts a
forward pre-hook on the model it is given that holds the call's ``attention_mask`` (a context
variable, so each thread sees its own call's) until the forward returns. A decoder inside the
model whose tokens that mask does not cover (DiffusionGemma's, over its canvas, whose forward
takes a ``decoder_attention_mask`` over its cache and canvas instead) holds none while it runs:
its blocks count every token.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_attention_mask: ContextVar[Tensor | None] = ContextVar("moe_attention_mask", default=None)


def thread_attention_mask(model: nn.Module) -> list[RemovableHandle]:
    """Hooks ``model`` so that its routers see the ``attention_mask`` of each forward call; the
    handles remove the hooks. A model whose ``forward`` takes no ``attention_mask`` gets none."""
    signature = _signature(model)
    if "attention_mask" not in _parameters(signature):
        return []
    handles = _hold_mask_while_running(model, signature)
    for module in model.modules():
        parameters = _parameters(_signature(module))
        if "decoder_attention_mask" in parameters and "attention_mask" not in parameters:
            handles += _hold_mask_while_running(module, None)
    return handles


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def _parameters(signature: inspect.Signature | None) -> Mapping[str, inspect.Parameter]:
    return {} if signature is None else signature.parameters


def _hold_mask_while_running(
    module: nn.Module, signature: inspect.Signature | None
) -> list[RemovableHandle]:
    """Hooks that hold the ``attention_mask`` of each call of ``module`` (its forward's
    ``signature``; None: no mask) while it runs."""
    entered = []

    def enter(_module, args, kwargs):
        mask = None
        if signature is not None:
            try:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:  # the forward itself will name the bad call
                pass
        entered.append(_attention_mask.set(mask if isinstance(mask, Tensor) else None))

    def leave(_module, _args, _output):
        _attention_mask.reset(entered.pop())

    return [
        module.register_forward_pre_hook(enter, with_kwargs=True),
        module.register_forward_hook(leave, always_call=True),
    ]


def counted_tokens(num_tokens: int, device: torch.device) -> Tensor | None:
    """The [num_tokens] bool mask of the real tokens of the running forward (its 2-D
    ``attention_mask``, flattened as the blocks flatten their tokens), or None: no mask, or one
    that does not map onto the routed tokens (a 4-D mask, a cache's longer mask), which is
    warned about since padding then counts."""
    mask = _attention_mask.get()
    if mask is None:
        return None
    if mask.dim() != 2 or mask.numel() != num_tokens:
        warnings.warn(
            f"moe_kernels: the attention_mask of shape {tuple(mask.shape)} does not map onto "
            f"the {num_tokens} routed tokens, so padding tokens count in the loss-free counts",
            stacklevel=3,
        )
        return None
    return mask.reshape(-1).to(device=device, dtype=torch.bool)
