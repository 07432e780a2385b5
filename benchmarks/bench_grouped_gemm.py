"""The grouped GEMM of expert FFNs against the baselines a user would otherwise run, in one run.

    python benchmarks/bench_grouped_gemm.py [--device cpu|cuda] [--dtype bf16|fp16|fp32]
                                            [--tokens N] [--repeats 5] [--models NAME ...]
                                            [--loads uniform skewed] [--out DIR] [--smoke]

Shapes of real models' MoE layers: "deepseek-v3" (256 experts, hidden 7168, expert FFN 2048,
top-8), "qwen3-moe" (Qwen3-30B-A3B: 128 experts, hidden 2048, FFN 768, top-8),
"deepseek-v2-lite" (64 experts, hidden 2048, FFN 1408, top-6) and "mixtral-8x7b" (8 experts,
hidden 4096, FFN 14336, top-2); by default the last two (the CPU's run). Each with uniform
routing and with skewed routing (experts drawn with Zipf-like popularity, so a few experts get
most rows and some get few); for each, the three products of training on the first expert
projection ([gate | up], N = 2F) and the second:
  - "up fwd"    rows [R, H] x [E, H, 2F]; "up fwd+swiglu" the same with the fused epilogue
    (baselines: their product, then silu(gate) * up);
  - "down fwd"  rows [R, F] x [E, F, H];
  - "up dgrad"  [R, 2F] x [E, H, 2F]^T, the input gradient;
  - "up wgrad"  [R, H]^T x [R, 2F] per expert, the weight gradient.
Columns: ours (the "auto" backend: the kernel ``build_info()["grouped_gemm"]`` names for the
device, which the title repeats; on an H100/H200 the wgmma kernel), on CUDA also our mma.sync
kernel by name ("mma": what sm_80/sm_89 run), the per-expert loop of library GEMMs (the
"cublas" backend: cuBLAS on CUDA, BLAS on the CPU), the Python loop of torch.mm per expert (the
reference), torch._grouped_mm where this torch supports the case (what the "torch" backend
runs, called directly, with its SwiGLU unfused), and one dense GEMM of the same FLOPs ([R, K] x
[K, N]: the ceiling). TFLOP/s are useful FLOPs (2 R K N) over the median
time; "of_dense" is ours over the dense GEMM's rate. Writes
<out>/bench_grouped_gemm_<device>_<dtype>.json and .md (``--out``, default benchmarks/results).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference as ref
from timer import DTYPES, measure, num_tokens, parse, parser, randn, save, sized, supported, unit


@dataclass(frozen=True)
class Model:
    name: str
    num_experts: int
    hidden: int
    ffn: int
    topk: int


MODELS = {
    m.name: m
    for m in [
        Model("deepseek-v3", num_experts=256, hidden=7168, ffn=2048, topk=8),
        Model("qwen3-moe", num_experts=128, hidden=2048, ffn=768, topk=8),
        Model("deepseek-v2-lite", num_experts=64, hidden=2048, ffn=1408, topk=6),
        Model("mixtral-8x7b", num_experts=8, hidden=4096, ffn=14336, topk=2),
    ]
}
CPU_MODELS = ["deepseek-v2-lite", "mixtral-8x7b"]
LOADS = ["uniform", "skewed"]


def routed_counts(model: Model, num_tokens: int, load: str, device: str) -> torch.Tensor:
    """Rows per expert of real top-k routing: k distinct experts per token, drawn uniformly or
    with popularity 1 / (rank + 1) (skewed)."""
    g = torch.Generator().manual_seed(0)
    popularity = torch.ones(model.num_experts)
    if load == "skewed":
        popularity = 1.0 / torch.arange(1, model.num_experts + 1, dtype=torch.float32)
    ids = torch.multinomial(popularity.expand(num_tokens, -1), model.topk, generator=g)
    return mk.expert_histogram(ids, model.num_experts).to(device)


def auto_kernel(device: str) -> str:
    """What backend="auto" runs on ``device``: "cpu", or the current GPU's kernel."""
    kernels = mk.build_info()["grouped_gemm"]
    if device == "cpu":
        return kernels["cpu"]
    prefix = f"cuda:{torch.cuda.current_device()} "
    return next((k for name, k in kernels.items() if name.startswith(prefix)), "no CUDA kernel")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def grouped_mm_wgrad(a: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a.t(), grad, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def swiglu(pre: torch.Tensor) -> torch.Tensor:
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def wgrad_loop(a: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sizes = counts.tolist()
    pairs = zip(a.split(sizes), grad.split(sizes), strict=True)
    return torch.stack([a_e.t() @ g_e for a_e, g_e in pairs])


def cases(model: Model, rows: torch.Tensor, counts: torch.Tensor, device: str, dtype):
    """(name, flops, ours, ours on the mma.sync kernel or None, library loop, python loop,
    torch._grouped_mm or None, dense)."""
    g = torch.Generator(device).manual_seed(1)
    E, H, Fh = model.num_experts, model.hidden, model.ffn
    R = rows.shape[0]
    w_up = randn(E, H, 2 * Fh, generator=g, dtype=dtype, scale=H**-0.5)
    w_down = randn(E, Fh, H, generator=g, dtype=dtype, scale=Fh**-0.5)
    h = randn(R, Fh, generator=g, dtype=dtype)
    grad_up = randn(R, 2 * Fh, generator=g, dtype=dtype)
    up_t = w_up.transpose(1, 2)  # [E, 2F, H] view: the dgrad's b^T without a copy
    dense_up, dense_down = w_up[0], w_down[0]

    def mma(fn):  # our mma.sync kernel, by name: CUDA only (the CPU has one path)
        return (lambda: fn(backend="mma")) if device == "cuda" and dtype != torch.float32 else None

    return [
        ("up fwd", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm(rows, w_up, counts),
         mma(lambda **kw: mk.grouped_gemm(rows, w_up, counts, **kw)),
         lambda: mk.grouped_gemm(rows, w_up, counts, backend="cublas"),
         lambda: ref.grouped_gemm(rows, w_up, counts),
         supported(lambda: grouped_mm(rows, w_up, counts)),
         lambda: rows @ dense_up),
        ("up fwd+swiglu", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm_swiglu(rows, w_up, counts),
         mma(lambda **kw: mk.grouped_gemm_swiglu(rows, w_up, counts, **kw)),
         lambda: swiglu(mk.grouped_gemm(rows, w_up, counts, backend="cublas")),
         lambda: swiglu(ref.grouped_gemm(rows, w_up, counts)),
         supported(lambda: swiglu(grouped_mm(rows, w_up, counts))),
         lambda: swiglu(rows @ dense_up)),
        ("down fwd", 2 * R * Fh * H,
         lambda: mk.grouped_gemm(h, w_down, counts),
         mma(lambda **kw: mk.grouped_gemm(h, w_down, counts, **kw)),
         lambda: mk.grouped_gemm(h, w_down, counts, backend="cublas"),
         lambda: ref.grouped_gemm(h, w_down, counts),
         supported(lambda: grouped_mm(h, w_down, counts)),
         lambda: h @ dense_down),
        ("up dgrad", 2 * R * 2 * Fh * H,
         lambda: mk.grouped_gemm(grad_up, w_up, counts, trans_b=True),
         mma(lambda **kw: mk.grouped_gemm(grad_up, w_up, counts, trans_b=True, **kw)),
         lambda: mk.grouped_gemm(grad_up, w_up, counts, trans_b=True, backend="cublas"),
         lambda: ref.grouped_gemm(grad_up, w_up, counts, trans_b=True),
         supported(lambda: grouped_mm(grad_up, up_t, counts)),
         lambda: grad_up @ dense_up.t()),
        ("up wgrad", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm_wgrad(rows, grad_up, counts),
         mma(lambda **kw: mk.grouped_gemm_wgrad(rows, grad_up, counts, **kw)),
         lambda: mk.grouped_gemm_wgrad(rows, grad_up, counts, backend="cublas"),
         lambda: wgrad_loop(rows, grad_up, counts),
         supported(lambda: grouped_mm_wgrad(rows, grad_up, counts)),
         lambda: rows.t() @ grad_up),
    ]  # fmt: skip


def bench(model: Model, load: str, tokens: int, device: str, dtype, repeats: int):
    """Yields one row per op: the TFLOP/s of ours and of each baseline, for one model and load."""
    counts = routed_counts(model, tokens, load, device)
    g = torch.Generator(device).manual_seed(0)
    rows = randn(int(counts.sum()), model.hidden, generator=g, dtype=dtype)
    sizes = counts.float()

    def tflops(flops: int, fn: Callable[[], object] | None) -> float | None:
        if fn is None:
            return None
        return flops / measure(fn, device, repeats=repeats).median_ms / 1e9

    for op, flops, *fns in cases(model, rows, counts, device, dtype):
        ours, mma, library, loop, gmm, dense = (tflops(flops, fn) for fn in fns)
        yield {
            "model": model.name,
            "load": load,
            "op": op,
            "rows_per_expert": f"{sizes.min():.0f}/{sizes.median():.0f}/{sizes.max():.0f}",
            "ours_TFLOPs": ours,
            "mma_TFLOPs": mma,
            "library_loop_TFLOPs": library,
            "python_loop_TFLOPs": loop,
            "grouped_mm_TFLOPs": gmm,
            "dense_TFLOPs": dense,
            "of_dense": ours / dense,
            "vs_library_loop": ours / library,
            "vs_grouped_mm": ours / gmm if gmm else None,
        }


def main() -> None:
    p = parser(__doc__, DTYPES, dtype="bf16", repeats=5)
    p.add_argument("--models", nargs="+", default=CPU_MODELS, choices=list(MODELS))
    p.add_argument("--loads", nargs="+", default=LOADS, choices=LOADS)
    args = parse(p)
    device, dtype = args.device, DTYPES[args.dtype]
    tokens = num_tokens(args, 16384 if device == "cuda" else 1024)
    results, failed = [], []
    for name in args.models:
        for load in args.loads:
            with unit(f"{name} {load}", failed):
                for row in bench(
                    sized(MODELS[name], args), load, tokens, device, dtype, args.repeats
                ):
                    results.append(row)
                    print(row, flush=True)
    for row in results:
        row["tokens"] = tokens
    save(
        f"bench_grouped_gemm_{device}_{args.dtype}",
        results,
        [
            "model",
            "load",
            "op",
            "rows_per_expert",
            "ours_TFLOPs",
            "mma_TFLOPs",
            "library_loop_TFLOPs",
            "python_loop_TFLOPs",
            "grouped_mm_TFLOPs",
            "dense_TFLOPs",
            "of_dense",
            "vs_library_loop",
            "vs_grouped_mm",
        ],
        f"Grouped GEMM, TFLOP/s ({device}, {args.dtype}, {tokens} tokens, ours: "
        f"{auto_kernel(device)}; rows per expert min/median/max)",
        args.out,
        failed,
    )


if __name__ == "__main__":
    main()
