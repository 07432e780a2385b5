"""NVTX ranges for the Python stages of a layer and a training step (router, dispatch,
experts, combine, balancer update, optimizer), beside the C++ ops' own ``moe_kernels::<op>``
ranges, so ``nsys profile`` shows where a step's time goes. Under 1 us each without a profiler.
Without the ``nvtx`` package (an optional dependency) the ranges are no-ops, and so they are
under torch.compile, which cannot trace them (a graph break each): compiled code shows as the
C++ ops' ranges and Inductor's kernels."""

from __future__ import annotations

import contextlib

import torch

try:
    import nvtx
except ImportError:  # the GPU image may lack it: ranges become no-ops
    nvtx = None


def nvtx_range(name: str) -> contextlib.AbstractContextManager[object]:
    """A range named ``name`` in the "moe_kernels" domain."""
    if nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain="moe_kernels")
