"""NVTX ranges for the Python stages of a layer and a training step (router, dispatch,
experts, combine, balancer update, optimizer), beside the C++ ops' own ``moe_kernels::<op>``
ranges, so ``nsys profile`` shows where a step's time goes; each is also a stage of the
``moe_kernels.timeline`` being recorded, if any. Under 1 us each without a profiler. Without the
``nvtx`` package (an optional dependency) the ranges are no-ops, and so they are under
torch.compile, which cannot trace them (a graph break each): compiled code shows as the C++ ops'
ranges and Inductor's kernels."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import timeline

try:
    import nvtx
except ImportError:  # the GPU image may lack it: ranges become no-ops
    nvtx = None

DOMAIN = "moe_kernels"


@contextlib.contextmanager
def _range_and_stage(name: str):
    with nvtx.annotate(name, domain=DOMAIN), timeline.stage(name):
        yield


def nvtx_range(name: str) -> contextlib.AbstractContextManager[object]:
    """A range named ``name`` in the "moe_kernels" domain, and a stage of the timeline."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if nvtx is None:
        return timeline.stage(name)
    return _range_and_stage(name)


def backward_range(name: str, inputs: Tensor, compute) -> Tensor:
    """``compute(inputs)``, with its backward in a range (and stage) named ``name``: the range
    opens when the output's gradient arrives and closes once the inputs' gradient is computed.
    Marks nothing under torch.compile, or without NVTX and a timeline being recorded."""
    if torch.compiler.is_compiling() or (nvtx is None and not timeline.recording()):
        return compute(inputs)
    return _Mark.apply(compute(_Mark.apply(inputs, name, False)), name, True)


class _Mark(torch.autograd.Function):
    """The identity, whose backward opens (``opens``) or closes the range ``name``."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, opens: bool) -> Tensor:
        ctx.name, ctx.opens = name, opens
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.opens:
            if nvtx is not None:
                nvtx.push_range(ctx.name, domain=DOMAIN)
            timeline.open_stage(ctx.name)
        else:
            timeline.close_stage(ctx.name)
            if nvtx is not None:
                nvtx.pop_range(domain=DOMAIN)
        return grad, None, None
