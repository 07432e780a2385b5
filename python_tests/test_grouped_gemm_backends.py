"""The grouped GEMM ops' ``backend`` choice (README "Grouped GEMM backends"): "auto" (the
default; "kernel" is its older name), the CUDA kernels by name ("wgmma", "mma"), and the
baselines "cublas" and "torch" (torch._grouped_mm).

"torch" is held to the pure-PyTorch reference on the CPU and on the emulator, forward and
through autograd; "auto" is "kernel" bit for bit; the kernels by name refuse native CPU tensors
and run on the emulator; build_info() names what "auto" runs on each device.
"""

import contextlib

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate

ops = torch.ops.moe_kernels
BACKENDS = ("auto", "kernel", "wgmma", "mma", "cublas", "torch")
CHOICES = "'auto', 'kernel', 'wgmma', 'mma', 'cublas', 'torch'"
# Empty experts first, inside and last; a single-row expert.
SEGMENTS = {"skewed_with_empty": [0, 9, 1, 0, 14, 0], "all_empty": [0, 0, 0], "uniform": [4] * 4}
# K and N multiples of 16 bytes in every dtype torch._grouped_mm takes.
K, N = 16, 24
# (rtol, atol relative to the largest value): SPEC.md's GEMM tolerances. The product, and in
# the backward the gradient of [gate | up], round to bf16 before the next step uses them, so
# bf16 errors are judged against the scale of the result.
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def operands(sizes, dtype, trans_b, k=K, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(sizes), k, generator=g).to(dtype)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b = torch.randn(*shape, generator=g).to(dtype)
    return a, b, torch.tensor(sizes)


def wgrad_reference(a, grad_c, sizes, trans_b):
    parts = zip(a.split(sizes), grad_c.split(sizes), strict=True)
    return torch.stack([(g_e.T @ a_e) if trans_b else (a_e.T @ g_e) for a_e, g_e in parts])


def assert_matches_reference(got, exact):
    """got (in its dtype) against the fp64 reference, at the spec's tolerance for its dtype."""
    assert got.shape == exact.shape
    rtol, atol = TOL[got.dtype]
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=atol * scale)


# --- "torch": torch._grouped_mm against the reference --------------------------------------


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_forward(case, trans_b, dtype):
    a, b, counts = operands(SEGMENTS[case], dtype, trans_b)
    exact = ref.grouped_gemm(a.double(), b.double(), counts, trans_b)
    assert_matches_reference(mk.grouped_gemm(a, b, counts, trans_b, backend="torch"), exact)
    got = mk.grouped_gemm_swiglu(a, b, counts, trans_b, backend="torch")
    assert_matches_reference(got, ref.swiglu(exact))


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_weight_gradient(case, trans_b, dtype):
    sizes = SEGMENTS[case]
    a, _, counts = operands(sizes, dtype, trans_b)
    grad_c = torch.randn(sum(sizes), N, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = mk.grouped_gemm_wgrad(a, grad_c, counts, trans_b, backend="torch")
    assert got.shape == ((len(sizes), N, K) if trans_b else (len(sizes), K, N))
    assert_matches_reference(got, wgrad_reference(a.double(), grad_c.double(), sizes, trans_b))
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.count_nonzero(got[e]) == 0  # empty experts get a zero gradient


def gradients(fn, a, b, upstream):
    """(out, d/da, d/db) of sum(fn(a, b) * upstream)."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = fn(a, b)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, a.grad, b.grad


@pytest.mark.parametrize("swiglu", [False, True], ids=["grouped_gemm", "grouped_gemm_swiglu"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_gradients_through_autograd(swiglu, trans_b, dtype):
    """The backward runs on the forward's backend: dA a "torch" grouped GEMM with b transposed
    the other way, dB a "torch" weight gradient."""
    sizes = SEGMENTS["skewed_with_empty"]
    a, b, counts = operands(sizes, dtype, trans_b)
    ours = mk.grouped_gemm_swiglu if swiglu else mk.grouped_gemm
    theirs = ref.grouped_gemm_swiglu if swiglu else ref.grouped_gemm
    upstream = torch.randn(sum(sizes), N // 2 if swiglu else N).to(dtype)
    got = gradients(lambda a, b: ours(a, b, counts, trans_b, backend="torch"), a, b, upstream)
    exact = gradients(
        lambda a, b: theirs(a, b, counts, trans_b), a.double(), b.double(), upstream.double()
    )
    for g, e in zip(got, exact, strict=True):
        assert_matches_reference(g, e)
    empty = [e for e, size in enumerate(sizes) if size == 0]
    assert torch.count_nonzero(got[2][empty]) == 0


def test_torch_backend_takes_int32_counts_fp16_and_unaligned_views():
    """Offsets from int32 counts; fp16 operands; a view that starts 4 bytes past an aligned
    address (torch._grouped_mm asks 16, so the op copies it)."""
    sizes = [3, 0, 5]
    a, b, counts = operands(sizes, torch.float32, False)
    storage = torch.randn(a.numel() + 1)
    shifted = storage[1:].view(a.shape)
    assert shifted.data_ptr() % 16 != 0
    exact = ref.grouped_gemm(shifted.double(), b.double(), counts)
    got = mk.grouped_gemm(shifted, b, counts.int(), backend="torch")
    assert_matches_reference(got, exact)
    got = mk.grouped_gemm(a.half(), b.half(), counts.int(), backend="torch")
    torch.testing.assert_close(
        got.double(), ref.grouped_gemm(a.double(), b.double(), counts), rtol=1e-2, atol=1e-2
    )


def test_swiglu_experts_run_on_the_torch_backend():
    """The experts module's products (transposed weights, SwiGLU then the down projection) on
    "torch" match "auto", values and gradients."""
    from moe_kernels.experts import swiglu_experts

    sizes = [5, 0, 7, 4]
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(sum(sizes), 16, generator=g)
    gate_up = torch.randn(4, 2 * 8, 16, generator=g)
    down = torch.randn(4, 16, 8, generator=g)
    counts = torch.tensor(sizes)
    results = []
    for backend in ("auto", "torch"):
        params = [t.clone().requires_grad_() for t in (rows, gate_up, down)]
        out = swiglu_experts(*params, counts, backend=backend)
        out.square().sum().backward()
        results.append([out, *(p.grad for p in params)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --- what "torch" refuses ---------------------------------------------------------------------

TORCH_REFUSALS = {
    "fp64": (
        lambda: mk.grouped_gemm(*operands([2, 2], torch.float64, False), backend="torch"),
        r"backend 'torch' \(torch._grouped_mm\) takes float32, bfloat16 or float16 operands, "
        r"got Double",
    ),
    "k_unaligned_bf16": (
        lambda: mk.grouped_gemm(*operands([2, 2], torch.bfloat16, False, k=12), backend="torch"),
        r"backend 'torch' \(torch._grouped_mm\) needs operand rows of a multiple of 16 bytes: "
        r"K \(a.size\(1\)\) must be a multiple of 8 for BFloat16, got 12",
    ),
    "n_unaligned_fp32_trans_b": (
        lambda: mk.grouped_gemm(
            *operands([2, 2], torch.float32, True, n=6), trans_b=True, backend="torch"
        ),
        r"N \(b.size\(1\)\) must be a multiple of 4 for Float, got 6",
    ),
    "swiglu_fp64": (
        lambda: mk.grouped_gemm_swiglu(*operands([2, 2], torch.float64, False), backend="torch"),
        r"takes float32, bfloat16 or float16 operands, got Double",
    ),
    "wgrad_n_unaligned": (
        lambda: mk.grouped_gemm_wgrad(
            torch.randn(4, 16), torch.randn(4, 5), torch.tensor([1, 3]), backend="torch"
        ),
        r"N \(grad_c.size\(1\)\) must be a multiple of 4 for Float, got 5",
    ),
    "counts_sum": (
        lambda: mk.grouped_gemm(
            torch.randn(4, 16), torch.randn(2, 16, 8), torch.tensor([2, 3]), backend="torch"
        ),
        r"tokens_per_expert must sum to at most the number of rows of a \(4\), got 5",
    ),
    "counts_negative": (
        lambda: mk.grouped_gemm_wgrad(
            torch.randn(4, 16), torch.randn(4, 8), torch.tensor([5, -1]), backend="torch"
        ),
        r"tokens_per_expert must be >= 0, got -1 for expert 1",
    ),
}


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "emu"])
@pytest.mark.parametrize("name", sorted(TORCH_REFUSALS))
def test_torch_backend_refusals_name_the_backend_and_the_reason(name, emulated):
    call, message = TORCH_REFUSALS[name]
    with emulate() if emulated else contextlib.nullcontext():
        with pytest.raises(RuntimeError, match=message):
            call()


# --- "auto", "kernel", the kernels by name, bad names ------------------------------------------


def test_auto_is_the_default_everywhere():
    for op in (ops.grouped_gemm, ops.grouped_gemm_swiglu, ops.grouped_gemm_wgrad):
        (backend,) = [arg for arg in op.default._schema.arguments if arg.name == "backend"]
        assert backend.default_value == "auto"
    assert mk.ops.GROUPED_GEMM_BACKENDS == BACKENDS


def products(a, b, counts, grad_c, **backend):
    """Every product of the family, SwiGLU's kept [gate | up] included."""
    return (
        mk.grouped_gemm(a, b, counts, **backend),
        mk.grouped_gemm(grad_c, b, counts, trans_b=True, **backend),
        *ops.grouped_gemm_swiglu(a, b, counts, **backend),
        mk.grouped_gemm_wgrad(a, grad_c, counts, **backend),
    )


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "emu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_is_kernel_bit_for_bit(emulated, dtype):
    a, b, counts = operands(SEGMENTS["skewed_with_empty"], dtype, False)
    grad_c = torch.randn(a.shape[0], N).to(dtype)
    with emulate() if emulated else contextlib.nullcontext():
        runs = [products(a, b, counts, grad_c, **kw) for kw in ({}, {"backend": "auto"})]
        runs.append(products(a, b, counts, grad_c, backend="kernel"))
    for run in runs[1:]:
        for got, first in zip(run, runs[0], strict=True):
            assert torch.equal(got, first)


@pytest.mark.parametrize("backend", ["wgmma", "mma"])
def test_kernels_by_name_refuse_native_cpu_tensors(backend):
    a, b, counts = operands([2, 2], torch.bfloat16, False)
    message = (
        rf"backend '{backend}' runs on CUDA tensors \(or on the CPU emulator under "
        r"moe_kernels.emulate\(\)\)"
    )
    for call in (
        lambda: mk.grouped_gemm(a, b, counts, backend=backend),
        lambda: mk.grouped_gemm_swiglu(a, b, counts, backend=backend),
        lambda: mk.grouped_gemm_wgrad(a, a, counts, backend=backend),
    ):
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "emu"])
def test_an_unknown_backend_names_the_choices(emulated):
    a, b, counts = operands([2, 2], torch.float32, False)
    message = rf"backend must be one of {CHOICES}, got 'cutlass'"
    with emulate() if emulated else contextlib.nullcontext():
        for call in (
            lambda: mk.grouped_gemm(a, b, counts, backend="cutlass"),
            lambda: mk.grouped_gemm_swiglu(a, b, counts, backend="cutlass"),
            lambda: mk.grouped_gemm_wgrad(a, a, counts, backend="cutlass"),
        ):
            with pytest.raises(RuntimeError, match=message):
                call()
    # The fake kernels check the name too (meta tensors never reach the native ops).
    with pytest.raises(RuntimeError, match=message):
        mk.grouped_gemm(a.to("meta"), b.to("meta"), counts.to("meta"), backend="cutlass")


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_each_tensor_core_kernel_runs_by_name_on_the_emulator(kernel):
    """bf16 with K, N and the SwiGLU half multiples of 8: the kernel by name (the emulated device
    is an sm_90, which has both), forward and backward."""
    sizes = [0, 9, 1, 6]
    a, b, counts = operands(sizes, torch.bfloat16, False, n=32)
    upstream = torch.randn(sum(sizes), 32).to(torch.bfloat16)
    with emulate():
        got = gradients(lambda a, b: mk.grouped_gemm(a, b, counts, backend=kernel), a, b, upstream)
        act = mk.grouped_gemm_swiglu(a, b, counts, backend=kernel)
    exact = gradients(
        lambda a, b: ref.grouped_gemm(a, b, counts), a.double(), b.double(), upstream.double()
    )
    for g, e in zip(got, exact, strict=True):
        assert_matches_reference(g, e)
    assert_matches_reference(act, ref.swiglu(exact[0]))


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize(
    "dtype,k,n", [(torch.float32, 16, 32), (torch.bfloat16, 30, 32), (torch.bfloat16, 16, 24)]
)
def test_a_kernel_by_name_says_what_it_needs_instead_of_falling_back(kernel, dtype, k, n):
    """fp32, K not a multiple of 8, a SwiGLU half of 12: auto takes the SIMT kernel, the tensor
    core kernels by name refuse."""
    a, b, counts = operands([3, 0, 8], dtype, False, k=k, n=n)
    with emulate(), pytest.raises(RuntimeError, match=f"backend '{kernel}' needs an sm_"):
        if n == 24:
            mk.grouped_gemm_swiglu(a, b, counts, backend=kernel)
        else:
            mk.grouped_gemm(a, b, counts, backend=kernel)


@pytest.mark.parametrize("trans_b", [False, True])
def test_torch_backend_runs_on_the_emulator(trans_b):
    """Under emulate() the CUDA host op sends "torch" to torch._grouped_mm on the CPU tensors."""
    sizes = [0, 5, 1, 6]
    a, b, counts = operands(sizes, torch.bfloat16, trans_b)
    grad_c = torch.randn(sum(sizes), N).to(torch.bfloat16)
    exact = ref.grouped_gemm(a.double(), b.double(), counts, trans_b)
    with emulate():
        out = mk.grouped_gemm(a, b, counts, trans_b, backend="torch")
        act = mk.grouped_gemm_swiglu(a, b, counts, trans_b, backend="torch")
        wgrad = mk.grouped_gemm_wgrad(a, grad_c, counts, trans_b, backend="torch")
    assert_matches_reference(out, exact)
    assert_matches_reference(act, ref.swiglu(exact))
    assert_matches_reference(wgrad, wgrad_reference(a.double(), grad_c.double(), sizes, trans_b))


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "emu"])
@pytest.mark.parametrize(
    "op", ["grouped_gemm", "grouped_gemm_swiglu", "grouped_gemm_wgrad", "grouped_gemm_trans_b"]
)
def test_opcheck_of_the_torch_backend(op, emulated):
    a, b, counts = operands([3, 0, 5], torch.float32, False)
    cases = {
        "grouped_gemm": (ops.grouped_gemm, (a.requires_grad_(), b, counts, False, "torch")),
        "grouped_gemm_trans_b": (
            ops.grouped_gemm,
            (a, b.transpose(1, 2).contiguous().requires_grad_(), counts, True, "torch"),
        ),
        "grouped_gemm_swiglu": (ops.grouped_gemm_swiglu, (a, b, counts.int(), False, "torch")),
        "grouped_gemm_wgrad": (
            ops.grouped_gemm_wgrad,
            (a.detach(), torch.randn(8, 12), counts, True, "torch"),
        ),
    }
    target, args = cases[op]
    with emulate() if emulated else contextlib.nullcontext():
        torch.library.opcheck(target, args)


# --- build_info --------------------------------------------------------------------------------


def test_build_info_names_what_auto_runs_per_device():
    kernels = mk.build_info()["grouped_gemm"]
    assert kernels["cpu"] == "cpu"
    gpus = {name: kernel for name, kernel in kernels.items() if name != "cpu"}
    if not (mk.build_info()["cuda"] and torch.cuda.is_available()):
        assert gpus == {}
        return
    assert len(gpus) == torch.cuda.device_count()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        name = f"cuda:{index} ({props.name}, sm_{props.major}{props.minor})"
        assert kernels[name] in ("wgmma", "mma", "simt")
        if props.major >= 8:
            assert kernels[name] != "simt"
        if props.major < 9:
            assert kernels[name] != "wgmma"
