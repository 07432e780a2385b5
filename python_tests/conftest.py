"""Shared test inputs and backends.

Backends: "cpu" (the native CPU kernels) always; "emu-forward" and "emu-reverse" (the CUDA
kernels on the CPU emulator, under two thread schedules) for ops with CUDA kernels; "cuda"
where a GPU is present and the CUDA kernel exists. A test takes them through the ``device``
fixture: ``@on_backends("op")`` parametrizes it, and the fixture gives the torch device of the
backend while the emulator is on for the emu backends.
"""

import pytest
import torch

import moe_kernels
from moe_kernels.emulator import emulate, emulated_ops

HAS_GPU = torch.cuda.is_available()
EMULATED_SCHEDULES = ("forward", "reverse")


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_kernels::{op}", dispatch_key)


def backends_for(*ops: str) -> list:
    """The backends a test of ``ops`` runs on: the CPU, the emulator when every op of the test
    has a CUDA kernel, and CUDA when a GPU and the kernels exist."""
    emulated = all(op in emulated_ops() for op in ops)
    emu = [
        pytest.param(
            f"emu-{schedule}",
            marks=pytest.mark.skipif(not emulated, reason="no CUDA kernel to emulate"),
        )
        for schedule in EMULATED_SCHEDULES
    ]
    cuda = pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (HAS_GPU and all(has_kernel(op, "CUDA") for op in ops)),
            reason="needs a GPU and the CUDA kernel",
        ),
    )
    return ["cpu", *emu, cuda]


def emulating() -> bool:
    """Whether the test runs on an emu backend (emulated kernels are slow: shrink big shapes)."""
    return moe_kernels._C.emulation()[0]


def on_backends(*ops: str):
    """Parametrizes a test's ``device`` fixture over ``backends_for(*ops)``."""
    return pytest.mark.parametrize("device", backends_for(*ops), indirect=True)


@pytest.fixture
def device(request):
    """The torch device of the backend; for "emu-<schedule>", "cpu" with the emulator on."""
    backend = getattr(request, "param", "cpu")
    if backend.startswith("emu-"):
        with emulate(backend.removeprefix("emu-"), seed=0):
            yield "cpu"
    else:
        yield backend


def tie_free_logits(
    num_tokens: int, num_experts: int, dtype=torch.float32, seed: int = 0
) -> torch.Tensor:
    """Router logits whose scores never tie within a token, even after rounding to ``dtype``.

    Each row is a random permutation of an evenly spaced grid on [-3, 3]: the grid step
    (6 / (E - 1) >= 0.023 for E <= 256) is wider than a bf16 ulp there, so values stay
    distinct in every dtype, and so do their sigmoid and softmax scores.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3.0, 3.0, num_experts, dtype=torch.float64)
    order = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=1)
    return grid[order].to(dtype)


def integer_bias(num_experts: int, seed: int = 1) -> torch.Tensor:
    """A bias in {-1, 0, 1}: it decides the choice (scores lie in (0, 1)) without creating
    ties, since two scores of one token never differ by a whole number."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (num_experts,), generator=g).to(torch.float32)


def random_ids(
    num_tokens: int, num_experts: int, topk: int, seed: int = 0, used: int | None = None
):
    """[T, k] distinct expert ids per token drawn from the first ``used`` experts (default all):
    the others receive no token."""
    used = num_experts if used is None else used
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, used, generator=g).argsort(dim=1)[:, :topk].contiguous()
