"""Run the ops' CUDA kernels on the CPU, on an emulator of the CUDA execution model.

Inside ``with moe_kernels.emulate(schedule):`` every op that has a CUDA kernel runs that kernel,
compiled as host C++, on CPU tensors: the same host code (checks, allocation, launch
configuration), the same kernel source, one fiber per CUDA thread. Threads switch only at
``__syncthreads``, warp collectives and exit. Between two ``__syncthreads`` the warps run one
after another, and within a warp the lanes run in rounds between warp collectives, both in the
order of ``schedule``: "forward" (thread 0 first), "reverse" or "random" (seeded). A kernel
with a race or a missing barrier then gives different results under different schedules,
and a barrier or collective that not every thread reaches raises an error naming the kernel.
Shared memory is filled with 0xff bytes (NaN, -1) at the start of every block.

This is how the CUDA kernels are tested on machines without a GPU. It is slow (a thread costs
tens of nanoseconds per barrier): use small shapes. The setting is process-wide, so backward
passes run by autograd see it too; ops without a CUDA kernel keep running natively.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import _C

SCHEDULES = ("forward", "reverse", "random")


@contextlib.contextmanager
def emulate(schedule: str = "forward", seed: int = 0) -> Iterator[None]:
    """Run the ops' CUDA kernels on the CPU emulator inside the ``with`` block.

    Args:
        schedule: order of the threads between barriers: "forward", "reverse" or "random".
        seed: seed of the "random" schedule (each block's order depends on it and the block).
    """
    previous = _C.emulation()
    _C.set_emulation(True, schedule, seed)
    try:
        yield
    finally:
        _C.set_emulation(*previous)


def emulated_ops() -> list[str]:
    """The ops that run their CUDA kernel on the emulator under :func:`emulate`."""
    return sorted(_C.emulated_ops())


def emulated_launches(reset: bool = False) -> dict[str, int]:
    """``{kernel: launches}`` on the emulator since the last reset (``reset=True`` also resets):
    the kernel names carry their template arguments, as a GPU profiler's trace shows them."""
    return dict(_C.emulated_launches(reset))
