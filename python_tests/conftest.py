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
from moe_kernels import reference as ref
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
    """The torch device of the backend; for "emu-<schedule>", "cpu" with the emulator on.

    On "cuda", fp32 matmuls of torch (cuBLAS: the tests' baselines, the "cublas" backend, the
    unpatched transformers models) run in IEEE fp32, never TF32: the kernels compute fp32 in
    fp32 (the SIMT kernel, no tensor cores), and the tests' fp32 tolerances assume both sides
    do. TF32 is off by default; this keeps it off whatever the process set before.
    """
    backend = getattr(request, "param", "cpu")
    if backend.startswith("emu-"):
        with emulate(backend.removeprefix("emu-"), seed=0):
            yield "cpu"
    elif backend == "cuda":
        # torch >= 2.9 names it fp32_precision ("ieee" or "tf32"); mixing it with the older
        # allow_tf32 flag is an error there, so only the older torch gets the older flag.
        matmul = torch.backends.cuda.matmul
        flag, ieee = ("fp32_precision", "ieee")
        if not hasattr(matmul, flag):
            flag, ieee = ("allow_tf32", False)
        before = getattr(matmul, flag)
        setattr(matmul, flag, ieee)
        try:
            yield backend
        finally:
            setattr(matmul, flag, before)
    else:
        yield backend


def tie_free_logits(
    num_tokens: int, num_experts: int, dtype=torch.float32, seed: int = 0
) -> torch.Tensor:
    """Router logits whose scores never tie within a token, even after rounding to ``dtype``.

    Each row is a random permutation of an evenly spaced grid on [-3, 3]: the grid step
    (6 / (E - 1) >= 0.023 for E <= 256) is wider than a bf16 ulp there, so values stay
    distinct in every dtype, and so do their scores (every score function is monotonic).
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3.0, 3.0, num_experts, dtype=torch.float64)
    order = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=1)
    return grid[order].to(dtype)


# How far a GPU's routing choice values may lie from the reference's. CUDA's expf is within
# 2 ulp (the host's libm within 1), nvcc contracts to FMA, and a softmax sum adds the token's
# terms in another order: a score may differ by a few fp32 ulps, bounded here by 2e-6 of the
# token's largest score. Adding the bias then rounds once more, by at most an ulp of the choice.
GPU_SCORE_RTOL = 2e-6


def near_ties(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    score_fn: str = "sigmoid",
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2",
    choose_on: str = "scores",
    **_,
) -> torch.Tensor:
    """[T] bool: the tokens whose routing a GPU may legitimately decide otherwise than the
    reference (SPEC.md section 1), with the choice values moved by the bound above.

    A token is decided when its kept groups' worst score beats the best dropped group by more
    than both groups' scores can move (each adds up to ``size`` choice values, and rounds at
    each addition), and its k chosen experts (after the group mask) are ordered, and ahead of
    the next, by more than two choice values can move. Equal logits with equal biases are no
    near tie: every device computes them the same value, and the lower index wins everywhere.
    tie_free_logits and integer_bias keep the choice values themselves far apart; group
    scores, sums of choice values, can still come close (sigmoid(x) + sigmoid(-x) = 1 makes
    two groups tie exactly), so group-limited routing on a GPU has a few such tokens.
    """
    eps = torch.finfo(torch.float32).eps
    x = logits.detach().cpu().double()
    scores = ref.score(x, score_fn)
    b = torch.zeros(x.shape[1], dtype=x.dtype) if bias is None else bias.detach().cpu().double()
    choice = (x if choose_on == "logits" else scores) + b
    choice = choice.masked_fill(choice.isnan(), float("-inf"))  # as every backend does
    num_tokens, num_experts = choice.shape
    largest_choice = choice.abs().masked_fill(~choice.isfinite(), 0).amax(dim=1)
    delta = (
        GPU_SCORE_RTOL * scores.masked_fill(scores.isnan(), 0).amax(dim=1) + eps * largest_choice
    )
    near = torch.zeros(num_tokens, dtype=torch.bool)
    if n_groups > 1:
        per_group = num_experts // n_groups
        size = ref.group_score_size(group_score, per_group, k, topk_groups)
        grouped = choice.view(num_tokens, n_groups, per_group)
        group_scores = grouped.topk(size, dim=-1).values.sum(dim=-1)
        group_delta = size * (delta + size * eps * largest_choice)
        ranked, order = group_scores.sort(dim=-1, descending=True, stable=True)
        if topk_groups < n_groups:
            gap = ranked[:, topk_groups - 1] - ranked[:, topk_groups]
            near |= ~(gap > 2 * group_delta)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, order[:, :topk_groups], True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, -1)
    order = choice.sort(dim=-1, descending=True, stable=True).indices[:, : k + 1]
    ranked = choice.gather(1, order)
    twins = (x.gather(1, order).diff(dim=1) == 0) & (b[order].diff(dim=1) == 0)
    close = ~(-ranked.diff(dim=1) > 2 * delta.unsqueeze(1)) & ~twins & ranked[:, 1:].isfinite()
    return near | close.any(dim=1)


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


TENSOR_CORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def exact_operand(rows: int, cols: int, dtype: str, seed: int) -> torch.Tensor:
    """Quarters in [-4, 4): exact in bf16 and fp16, and so are their products and fp32 sums."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 16, (rows, cols), generator=g) / 4).to(TENSOR_CORE_DTYPES[dtype])


def bits(t: torch.Tensor) -> list:
    """A 16-bit tensor's elements as int16 bit patterns, row-major (what the self-tests take)."""
    return t.contiguous().view(torch.int16).flatten().tolist()
