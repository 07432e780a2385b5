"""The attention mask a patched model receives, threaded to its routers, so that the loss-free
counts take only real tokens: padding is routed as the model routes it, but not counted.

transformers' MoE blocks never see the mask, and their models are not changed: ``patch`` puts a
forward pre-hook on the model it is given that holds the call's ``attention_mask`` (a context
variable, so each thread sees its own call's) until the forward returns.
"""

from __future__ import annotations

import inspect
import warnings
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_attention_mask: ContextVar[Tensor | None] = ContextVar("moe_attention_mask", default=None)


def thread_attention_mask(model: nn.Module) -> list[RemovableHandle]:
    """Hooks ``model`` so that its routers see the ``attention_mask`` of each forward call; the
    handles remove the hooks. A model whose ``forward`` takes no ``attention_mask`` gets none."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    if "attention_mask" not in signature.parameters:
        return []
    entered = []

    def enter(_module, args, kwargs):
        try:
            mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except TypeError:  # the forward itself will name the bad call
            mask = None
        entered.append(_attention_mask.set(mask if isinstance(mask, Tensor) else None))

    def leave(_module, _args, _output):
        _attention_mask.reset(entered.pop())

    return [
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, always_call=True),
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
