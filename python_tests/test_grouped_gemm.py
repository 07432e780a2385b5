"""The grouped GEMM family against the reference (SPEC.md section 4): forward, input gradient,
weight gradient and the SwiGLU epilogue, on every backend.

On CUDA (and its emulator) the shapes pick the kernel: bf16/fp16 with K and N multiples of 8
run on tensor cores (mma.sync, ldmatrix, cp.async), fp32/fp64 and unaligned 16-bit shapes on
the SIMT kernel. Shapes are ragged on purpose: rows not a multiple of the 128-row tile, K and N
not multiples of 64, single-row and empty experts. Accuracy is judged as the issue asks: the
error against an fp64 reference at most twice that of torch's own matmul in the same dtype.

No test asks a GPU for the emulator's bits: its tensor cores add a k16 step's exact products in
one fused adder that truncates (the emulator adds them in k order, rounding each time), and nvcc
contracts the SIMT kernel's fp32 multiply-adds to FMAs (one rounding instead of two). Both move
the fp32 accumulators by ulps, far below the bf16/fp16 rounding of the output and the fp32
errors of torch's matmul; the order of the sums is the emulator's (no split-K, no atomics).
"""

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels as mk
from conftest import emulating, on_backends
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate

SEGMENTS = {
    "uniform": [16, 16, 16, 16],
    "skewed_with_empty": [0, 37, 1, 0, 130, 5, 0, 2],
    "single_rows": [1, 1, 0, 1],
    "all_empty": [0, 0, 0],
    "many_experts": [3, 0, 7, 1] * 16,
}
# (K, N): tensor-core aligned, aligned but ragged against the 64-wide tiles, unaligned.
SHAPES = {"k64_n128": (64, 128), "k72_n40": (72, 40), "k30_n50": (30, 50)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# SwiGLU and its variants (ops.swiglu): gpt-oss's clamped alpha-SwiGLU, and a clamp alone (the
# tests' operands reach |x| ~ 10, so the clamps bite).
GLUS = {
    "swiglu": {},
    "gpt_oss": dict(alpha=1.702, limit=7.0, up_offset=1.0),
    "clamped": dict(limit=3.0),
}
# "auto" runs the device's fastest kernel (the wgmma kernel on the emulated sm_90, as on an
# H100); "mma" the mma.sync kernel by name (what sm_80/sm_89 run), where it takes the problem:
# both tensor-core kernels are proven by every test that takes `kernel`.
KERNELS = ["auto", "mma"]


def skip_unless_mma_takes(kernel, device, dtype, *dims):
    if kernel == "mma" and (
        (device == "cpu" and not emulating())
        or dtype not in (torch.bfloat16, torch.float16)
        or any(d % 8 for d in dims)
    ):
        pytest.skip("mma.sync takes bf16/fp16 with K and N multiples of 8, on CUDA")


def operands(sizes, k, n, dtype, trans_b, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    m, e = sum(sizes), len(sizes)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(e, n, k, generator=g) if trans_b else torch.randn(e, k, n, generator=g)
    counts = torch.tensor(sizes, dtype=torch.int64)
    return a.to(device, dtype), b.to(device, dtype), counts.to(device)


def assert_as_accurate_as_torch(got, exact, same_dtype_torch):
    """|got - exact| at most twice torch's own error in got's dtype (plus half an ulp of the
    largest value, for outputs where torch happens to be exact). torch's matmul runs on the
    CPU whatever the backend: a fixed yardstick, which the GPU's summation (tensor cores, FMA)
    meets as the emulator's does."""
    assert got.dtype == same_dtype_torch.dtype and got.shape == exact.shape
    ours = (got.cpu().double() - exact).abs().max().item() if got.numel() else 0.0
    theirs = (same_dtype_torch.cpu().double() - exact).abs().max().item() if got.numel() else 0.0
    floor = 0.5 * torch.finfo(got.dtype).eps * (exact.abs().max().item() if got.numel() else 0.0)
    assert ours <= 2 * theirs + floor, f"error {ours:.3g} vs torch's {theirs:.3g}"


@on_backends("grouped_gemm")
@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward(device, case, shape, trans_b, dtype, kernel):
    skip_unless_mma_takes(kernel, device, dtype, *SHAPES[shape])
    a, b, counts = operands(SEGMENTS[case], *SHAPES[shape], dtype, trans_b, device)
    got = mk.grouped_gemm(a, b, counts, trans_b=trans_b, backend=kernel)
    exact = ref.grouped_gemm(a.cpu().double(), b.cpu().double(), counts.cpu(), trans_b)
    assert_as_accurate_as_torch(
        got, exact, ref.grouped_gemm(a.cpu(), b.cpu(), counts.cpu(), trans_b)
    )


@on_backends("grouped_gemm_wgrad")
@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_weight_gradient(device, case, trans_b, dtype, kernel):
    skip_unless_mma_takes(kernel, device, dtype, 72, 40)
    sizes = SEGMENTS[case]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(sum(sizes), 72, generator=g).to(device, dtype)
    grad_c = torch.randn(sum(sizes), 40, generator=g).to(device, dtype)
    counts = torch.tensor(sizes).to(device)
    got = mk.grouped_gemm_wgrad(a, grad_c, counts, trans_b, backend=kernel)

    def wgrad(a, grad_c):
        parts = zip(a.split(sizes), grad_c.split(sizes), strict=True)
        per_expert = [(g_e.T @ a_e) if trans_b else (a_e.T @ g_e) for a_e, g_e in parts]
        return torch.stack(per_expert)

    exact = wgrad(a.cpu().double(), grad_c.cpu().double())
    assert_as_accurate_as_torch(got, exact, wgrad(a.cpu(), grad_c.cpu()))
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.count_nonzero(got[e]) == 0  # empty experts get a zero gradient


@on_backends("grouped_gemm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thousands_of_rows(device, dtype):
    # Many 128-row tiles per expert, a single-row expert, an empty one, int32 counts.
    sizes = [2000, 0, 1, 1500] if not emulating() else [700, 0, 1, 300]
    a, b, counts = operands(sizes, 64, 72, dtype, False, device)
    got = mk.grouped_gemm(a, b, counts.int())
    exact = ref.grouped_gemm(a.cpu().double(), b.cpu().double(), counts.cpu())
    assert_as_accurate_as_torch(got, exact, ref.grouped_gemm(a.cpu(), b.cpu(), counts.cpu()))


def gradients(fn, a, b, upstream):
    """(d/da, d/db) of sum(fn(a, b) * upstream)."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    (fn(a, b) * upstream.to(a.device, a.dtype)).sum().backward()
    return a.grad, b.grad


@on_backends("grouped_gemm", "grouped_gemm_wgrad")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hundreds_of_experts(device, dtype):
    # The tile schedule scans the counts 256 experts at a time; most experts here are empty.
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(600, dtype=torch.int64)
    counts[torch.randperm(600, generator=g)[:40]] = torch.randint(1, 9, (40,), generator=g)
    sizes = counts.tolist()
    a, b, _ = operands(sizes, 16, 24, dtype, False, device)
    got = mk.grouped_gemm(a, b, counts.to(device))
    exact = ref.grouped_gemm(a.cpu().double(), b.cpu().double(), counts)
    assert_as_accurate_as_torch(got, exact, ref.grouped_gemm(a.cpu(), b.cpu(), counts))
    grad = torch.randn(a.shape[0], 24, generator=g).to(device, dtype)
    got = mk.grouped_gemm_wgrad(a, grad, counts.to(device))
    assert got.shape == (600, 16, 24)
    for e in (counts == 0).nonzero().flatten().tolist()[:50]:
        assert torch.count_nonzero(got[e]) == 0
    nonzero = (counts > 0).nonzero().flatten().tolist()
    starts = torch.cumsum(counts, 0) - counts
    for e in nonzero[:10]:
        rows = slice(int(starts[e]), int(starts[e] + counts[e]))
        want = a.cpu().double()[rows].T @ grad.cpu().double()[rows]
        # bf16 output rounding (2^-9 relative) bounds the error on every backend; fp32 at most
        # 8 products per element is far inside it.
        torch.testing.assert_close(got[e].cpu().double(), want, rtol=2e-2, atol=5e-2)


@on_backends("grouped_gemm", "grouped_gemm_wgrad", "grouped_gemm_swiglu", "swiglu_backward")
@pytest.mark.parametrize("case", ["uniform", "skewed_with_empty", "all_empty"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [None, *GLUS])
@pytest.mark.parametrize("kernel", KERNELS)
def test_backward(device, case, trans_b, dtype, swiglu, kernel):
    skip_unless_mma_takes(kernel, device, dtype, 24, 48)
    glu = GLUS.get(swiglu, {})
    ours, reference = (
        (partial(mk.grouped_gemm_swiglu, **glu), partial(ref.grouped_gemm_swiglu, **glu))
        if swiglu
        else (mk.grouped_gemm, ref.grouped_gemm)
    )
    a, b, counts = operands(SEGMENTS[case], 24, 48, dtype, trans_b, device)
    upstream = torch.randn(
        a.shape[0], 24 if swiglu else 48, generator=torch.Generator().manual_seed(9)
    )
    got = gradients(
        lambda a, b: ours(a, b, counts, trans_b, backend=kernel), a, b, upstream.to(dtype)
    )
    on_cpu = lambda a, b: reference(a, b, counts.cpu(), trans_b)  # noqa: E731
    exact = gradients(on_cpu, a.cpu().double(), b.cpu().double(), upstream.to(dtype))
    torch_same_dtype = gradients(on_cpu, a.cpu(), b.cpu(), upstream.to(dtype))
    for grad, want, theirs in zip(got, exact, torch_same_dtype, strict=True):
        assert_as_accurate_as_torch(grad, want, theirs)


def test_backward_with_broadcast_gradient():
    # .sum() hands backward a stride-0 gradient (torch._grouped_mm's backward fails on it).
    a, b, counts = operands([5, 0, 9], 8, 6, torch.float32, False)
    a.requires_grad_(), b.requires_grad_()
    mk.grouped_gemm(a, b, counts).sum().backward()
    row_sums = b.detach().sum(dim=2)  # d(sum(a_e @ b_e))/d(a_e) = each row of b_e summed
    torch.testing.assert_close(
        a.grad, torch.cat([row_sums[0].expand(5, 8), row_sums[2].expand(9, 8)])
    )
    torch.testing.assert_close(b.grad[0], a.detach()[:5].sum(0).unsqueeze(1).expand(8, 6))
    assert torch.count_nonzero(b.grad[1]) == 0


@on_backends("grouped_gemm", "grouped_gemm_wgrad")
@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck_fp64(device, trans_b):
    a, b, counts = operands([3, 0, 4, 1], 5, 6, torch.float64, trans_b, device)
    a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mk.grouped_gemm(a, b, counts, trans_b), (a, b))


@on_backends("grouped_gemm_swiglu")
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("glu", sorted(GLUS))
def test_swiglu_forward(device, shape, trans_b, dtype, kernel, glu):
    k, n = SHAPES[shape]
    skip_unless_mma_takes(kernel, device, dtype, k, n)
    a, b, counts = operands(SEGMENTS["skewed_with_empty"], k, 2 * n, dtype, trans_b, device)
    got = mk.grouped_gemm_swiglu(a, b, counts, trans_b, backend=kernel, **GLUS[glu])
    on_cpu = lambda a, b: ref.grouped_gemm_swiglu(a, b, counts.cpu(), trans_b, **GLUS[glu])  # noqa: E731
    exact = on_cpu(a.cpu().double(), b.cpu().double())
    assert_as_accurate_as_torch(got, exact, on_cpu(a.cpu(), b.cpu()))


@on_backends("grouped_gemm_swiglu")
@pytest.mark.parametrize("glu", sorted(GLUS))
@pytest.mark.parametrize("kernel", ["cublas", "torch"])
def test_swiglu_variants_of_the_library_products(device, glu, kernel):
    a, b, counts = operands(SEGMENTS["skewed_with_empty"], 64, 128, torch.float32, False, device)
    got = mk.grouped_gemm_swiglu(a, b, counts, backend=kernel, **GLUS[glu])
    on_cpu = lambda a, b: ref.grouped_gemm_swiglu(a, b, counts.cpu(), **GLUS[glu])  # noqa: E731
    assert_as_accurate_as_torch(got, on_cpu(a.cpu().double(), b.cpu().double()), on_cpu(a, b))


@on_backends("swiglu", "swiglu_backward")
@pytest.mark.parametrize("half", [24, 13])  # packs of 16 bytes, and single elements
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("glu", sorted(GLUS))
def test_swiglu_op_and_its_gradient(device, half, dtype, glu):
    g = torch.Generator().manual_seed(6)
    pre = (4 * torch.randn(37, 2 * half, generator=g)).to(device, dtype).requires_grad_()
    grad_out = torch.randn(37, half, generator=g).to(device, dtype)
    out = mk.swiglu(pre, **GLUS[glu])
    (grad_pre,) = torch.autograd.grad(out, pre, grad_out)
    exact_pre = pre.detach().cpu().double().requires_grad_()
    exact = ref.swiglu(exact_pre, **GLUS[glu])
    (exact_grad,) = torch.autograd.grad(exact, exact_pre, grad_out.cpu().double())
    assert out.dtype == dtype and grad_pre.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(out.detach().cpu().double(), exact.detach(), **tol)
    torch.testing.assert_close(grad_pre.cpu().double(), exact_grad, **tol)
    if GLUS[glu].get("limit"):  # the clamps bite, and pass no gradient where they do
        limit = GLUS[glu]["limit"]
        gate, up = pre.detach().cpu().float().chunk(2, dim=1)
        clamped = torch.cat([gate > limit, up.abs() > limit], dim=1)
        assert clamped.any() and not grad_pre.cpu()[clamped].any()


@on_backends("grouped_gemm_swiglu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [*KERNELS, "cublas", "torch"])
def test_swiglu_product_not_kept(device, dtype, kernel):
    """keep_product=False: the same activation, and an empty product. The CPU computes such a
    product in blocks of 16 MB (512 rows of this width in fp32, 1024 in bf16), which these
    experts span and end inside of; the CUDA kernels skip its stores."""
    sizes, k, f = ([1100, 0, 2100, 1], 16, 4096) if not emulating() else ([37, 0, 130, 1], 64, 64)
    skip_unless_mma_takes(kernel, device, dtype, k, 2 * f)
    a, b, counts = operands(sizes, k, 2 * f, dtype, False, device)
    out, pre = torch.ops.moe_kernels.grouped_gemm_swiglu(a, b, counts, False, kernel, False)
    assert pre.shape == (0, 2 * f) and pre.dtype == dtype and pre.device == a.device
    exact = ref.grouped_gemm_swiglu(a.cpu().double(), b.cpu().double(), counts.cpu())
    assert_as_accurate_as_torch(out, exact, ref.grouped_gemm_swiglu(a.cpu(), b.cpu(), counts.cpu()))


class KeepProductCalls(TorchDispatchMode):
    """Records the keep_product argument of every grouped_gemm_swiglu call."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.moe_kernels.grouped_gemm_swiglu.default:
            schema = {arg.name: arg.default_value for arg in func._schema.arguments}
            given = dict(zip(schema, args, strict=False)) | (kwargs or {})
            self.kept.append(given.get("keep_product", schema["keep_product"]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "grad_of, mode, kept",
    [
        ((), torch.enable_grad, False),
        (("a",), torch.no_grad, False),
        (("a", "b"), torch.inference_mode, False),
        (("b",), torch.enable_grad, True),
        (("a", "b"), torch.enable_grad, True),
    ],
)
def test_the_product_is_kept_only_for_a_backward(grad_of, mode, kept):
    a, b, counts = operands([5, 0, 9], 8, 12, torch.float32, False)
    a.requires_grad_("a" in grad_of), b.requires_grad_("b" in grad_of)
    calls = KeepProductCalls()
    with mode(), calls:
        mk.grouped_gemm_swiglu(a, b, counts)
    assert calls.kept == [kept]


def test_a_product_not_kept_refuses_a_backward():
    a, b, counts = operands([5, 0, 9], 8, 12, torch.float32, False)
    with pytest.raises(RuntimeError, match="keep_product=False keeps no product"):
        torch.ops.moe_kernels.grouped_gemm_swiglu(
            a.requires_grad_(), b, counts, False, "auto", False
        )


@on_backends("swiglu_backward")
@pytest.mark.parametrize("half", [24, 13])  # packs of 16 bytes, and single elements
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_op(device, half, dtype):
    g = torch.Generator().manual_seed(4)
    pre = (3 * torch.randn(37, 2 * half, generator=g)).to(device, dtype)
    grad_out = torch.randn(37, half, generator=g).to(device, dtype)
    got = mk.swiglu_backward(grad_out, pre)
    exact = ref.swiglu_backward(grad_out.cpu().double(), pre.cpu().double())
    # fp32: a few ulps of CUDA's expf and of FMA contraction on a GPU; 16-bit: the output's
    # rounding (2^-9 relative for bf16).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got.cpu().double(), exact, **tol)


@on_backends("grouped_gemm_wgrad", "swiglu_backward")
@pytest.mark.parametrize("rows", [37, 9000])  # one chunk of SwiGLU's rows, and several threads'
def test_backward_only_ops_take_inputs_that_require_grad(device, rows):
    # Called directly (no autograd kernel of their own), with grad mode on: the same values as
    # on plain tensors, and no out= op refused inside.
    g = torch.Generator().manual_seed(5)
    a, grad_c, pre = (torch.randn(rows, n, generator=g).to(device) for n in (24, 16, 32))
    counts = torch.tensor([rows // 3, 0, rows - rows // 3]).to(device)
    want = mk.grouped_gemm_wgrad(a, grad_c, counts), mk.swiglu_backward(grad_c, pre)
    a, grad_c, pre = (t.clone().requires_grad_() for t in (a, grad_c, pre))
    got = mk.grouped_gemm_wgrad(a, grad_c, counts), mk.swiglu_backward(grad_c, pre)
    for got_t, want_t in zip(got, want, strict=True):
        assert torch.equal(got_t.detach(), want_t)


@on_backends("grouped_gemm_swiglu", "swiglu_backward", "grouped_gemm", "grouped_gemm_wgrad")
@pytest.mark.parametrize("glu", sorted(GLUS))
def test_swiglu_gradcheck_fp64(device, glu):
    # Operands of |x| <= ~5 and a limit 7 or 3 away from them: finite differences never cross it.
    a, b, counts = operands([3, 0, 4, 1], 5, 8, torch.float64, True, device)
    a.requires_grad_(), b.requires_grad_()
    fused = partial(mk.grouped_gemm_swiglu, tokens_per_expert=counts, trans_b=True, **GLUS[glu])
    assert torch.autograd.gradcheck(fused, (a, b))


@on_backends("grouped_gemm", "grouped_gemm_swiglu", "grouped_gemm_wgrad")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_backend_agrees(device, dtype):
    a, b, counts = operands(SEGMENTS["skewed_with_empty"], 64, 48, dtype, False, device)
    grad = torch.randn(a.shape[0], 48).to(device, dtype)
    # Two summation orders on one device. fp32: both IEEE fp32 (cuBLAS without TF32: the
    # device fixture), K = 64 terms of about 1, a few 1e-6 apart. bf16: both round fp32
    # accumulators to bf16 (cuBLAS may also reduce split-K partials in bf16), an ulp or two of
    # outputs of about 8.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for op, args in [
        (mk.grouped_gemm, (a, b, counts)),
        (mk.grouped_gemm_swiglu, (a, b, counts)),
        (mk.grouped_gemm_wgrad, (a, grad, counts)),
    ]:
        torch.testing.assert_close(
            op(*args, backend="cublas").float(), op(*args, backend="kernel").float(), **tol
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_kernels_are_race_free(dtype):
    """The same bits under both thread orders (and both cp.async landing times): a missing
    barrier or cp.async wait would make them differ."""
    a, b, counts = operands(SEGMENTS["skewed_with_empty"], 72, 80, dtype, False)
    grad = torch.randn(a.shape[0], 80).to(dtype)
    runs = []
    for schedule in ("forward", "reverse", "random"):
        with emulate(schedule, seed=3):
            runs.append(
                (
                    mk.grouped_gemm(a, b, counts),
                    mk.grouped_gemm_swiglu(a, b, counts),
                    mk.grouped_gemm_wgrad(a, grad, counts),
                )
            )
    for run in runs[1:]:
        for got, first in zip(run, runs[0], strict=True):
            assert torch.equal(got, first)


def test_wrong_counts_never_read_outside_the_rows():
    """The kernel backend does not check counts (that would synchronise): counts past the rows
    are clamped, so the experts that fit are right and nothing outside a is read (the ASan
    build of the emulator would report it)."""
    a, b, _ = operands([6, 6], 16, 8, torch.bfloat16, False)
    with emulate():
        got = mk.grouped_gemm(a, b, torch.tensor([6, 100]))
    torch.testing.assert_close(
        got[:6].float(), (a[:6].float() @ b[0].float()), rtol=1e-2, atol=1e-2
    )
    torch.testing.assert_close(
        got[6:].float(), (a[6:].float() @ b[1].float()), rtol=1e-2, atol=1e-2
    )


# Busy experts of unequal sizes, so with 2 threads each thread runs whole experts (the largest
# first), with 1 thread they run in order. SwiGLU's rows pass 2048 (one cache-sized chunk at
# this width), so its backward splits them over the threads. No expert passes 700 rows: MKL,
# called in a worker, plans a longer reduction for all threads (its inner team then runs on one),
# which changes the order of the sums.
SPREAD_CASES = {
    "grouped_gemm": (mk.grouped_gemm, [3, 0, 7, 1, 40, 0, 12, 5] * 8, 40),
    "grouped_gemm_swiglu": (mk.grouped_gemm_swiglu, [300, 0, 500, 41, 700, 260, 600, 9] * 2, 32),
}


@pytest.mark.parametrize("op", sorted(SPREAD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_work_spread_over_threads_gives_the_serial_results(op, dtype):
    # Same results with 1 and 2 threads, bit for bit, under autograd too: the workers take over
    # the caller's dispatch state, or their ATen calls on views of saved outputs that require
    # grad would go to autograd (and out= calls be refused).
    fn, sizes, n = SPREAD_CASES[op]
    width = 2 * n if fn is mk.grouped_gemm_swiglu else n
    a, b, counts = operands(sizes, 72, width, dtype, trans_b=True)
    grad = torch.randn(sum(sizes), n).to(dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
            out = fn(a_, b_, counts, trans_b=True)
            out.backward(grad)
            results.append((out, a_.grad, b_.grad))
    finally:
        torch.set_num_threads(threads)
    for serial, spread in zip(*results, strict=True):
        assert torch.equal(serial, spread)
