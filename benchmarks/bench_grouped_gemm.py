"""The grouped GEMM of expert FFNs against the baselines a user would otherwise run, in one run.

    python benchmarks/bench_grouped_gemm.py [--device cpu|cuda] [--dtype bf16|fp16|fp32]
                                            [--tokens N] [--repeats 5] [--models NAME ...]

Shapes of real models: a DeepSeek-V2-Lite-style layer (64 experts, hidden 2048, expert FFN
1408, top-6) and a Mixtral-8x7B-style one (8 experts, hidden 4096, FFN 14336, top-2), with
uniform routing and skewed routing (experts drawn with Zipf-like popularity, so a few experts
get most rows and some get few). For each, the three products of training on the first expert
projection ([gate | up], N = 2F) and the second:
  - "up fwd"    rows [R, H] x [E, H, 2F]; "up fwd+swiglu" the same with the fused epilogue
    (baselines: their product, then silu(gate) * up);
  - "down fwd"  rows [R, F] x [E, F, H];
  - "up dgrad"  [R, 2F] x [E, H, 2F]^T, the input gradient;
  - "up wgrad"  [R, H]^T x [R, 2F] per expert, the weight gradient.
Columns: our kernel ("kernel" backend), the per-expert loop of library GEMMs (the "cublas"
backend: cuBLAS on CUDA, BLAS on the CPU), the Python loop of torch.mm per expert (the
reference), torch._grouped_mm where this torch supports the case, and one dense GEMM of the
same FLOPs ([R, K] x [K, N]: the ceiling). TFLOP/s are useful FLOPs (2 R K N) over the median
time; "of_dense" is ours over the dense GEMM's rate. Writes
results/bench_grouped_gemm_<device>_<dtype>.json and .md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference as ref
from timer import measure, save

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        Model("deepseek-v2-lite", num_experts=64, hidden=2048, ffn=1408, topk=6),
        Model("mixtral-8x7b", num_experts=8, hidden=4096, ffn=14336, topk=2),
    ]
}


def routed_counts(model: Model, num_tokens: int, load: str, device: str) -> torch.Tensor:
    """Rows per expert of real top-k routing: k distinct experts per token, drawn uniformly or
    with popularity 1 / (rank + 1) (skewed)."""
    g = torch.Generator().manual_seed(0)
    popularity = torch.ones(model.num_experts)
    if load == "skewed":
        popularity = 1.0 / torch.arange(1, model.num_experts + 1, dtype=torch.float32)
    ids = torch.multinomial(popularity.expand(num_tokens, -1), model.topk, generator=g)
    return mk.expert_histogram(ids, model.num_experts).to(device)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def grouped_mm_wgrad(a: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a.t(), grad, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def supported(fn: Callable[[], object]) -> Callable[[], object] | None:
    """fn, or None when this torch cannot run it (torch._grouped_mm's dtype/device limits)."""
    try:
        fn()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return fn


def swiglu(pre: torch.Tensor) -> torch.Tensor:
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def wgrad_loop(a: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sizes = counts.tolist()
    pairs = zip(a.split(sizes), grad.split(sizes), strict=True)
    return torch.stack([a_e.t() @ g_e for a_e, g_e in pairs])


def cases(model: Model, rows: torch.Tensor, counts: torch.Tensor, device: str, dtype):
    """(name, flops, ours, library loop, python loop, torch._grouped_mm or None, dense)."""
    g = torch.Generator().manual_seed(1)
    E, H, Fh = model.num_experts, model.hidden, model.ffn
    R = rows.shape[0]
    w_up = (torch.randn(E, H, 2 * Fh, generator=g) / H**0.5).to(device, dtype)
    w_down = (torch.randn(E, Fh, H, generator=g) / Fh**0.5).to(device, dtype)
    h = torch.randn(R, Fh, generator=g).to(device, dtype)
    grad_up = torch.randn(R, 2 * Fh, generator=g).to(device, dtype)
    up_t = w_up.transpose(1, 2)  # [E, 2F, H] view: the dgrad's b^T without a copy
    dense_up, dense_down = w_up[0], w_down[0]
    return [
        ("up fwd", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm(rows, w_up, counts),
         lambda: mk.grouped_gemm(rows, w_up, counts, backend="cublas"),
         lambda: ref.grouped_gemm(rows, w_up, counts),
         supported(lambda: grouped_mm(rows, w_up, counts)),
         lambda: rows @ dense_up),
        ("up fwd+swiglu", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm_swiglu(rows, w_up, counts),
         lambda: swiglu(mk.grouped_gemm(rows, w_up, counts, backend="cublas")),
         lambda: swiglu(ref.grouped_gemm(rows, w_up, counts)),
         supported(lambda: swiglu(grouped_mm(rows, w_up, counts))),
         lambda: swiglu(rows @ dense_up)),
        ("down fwd", 2 * R * Fh * H,
         lambda: mk.grouped_gemm(h, w_down, counts),
         lambda: mk.grouped_gemm(h, w_down, counts, backend="cublas"),
         lambda: ref.grouped_gemm(h, w_down, counts),
         supported(lambda: grouped_mm(h, w_down, counts)),
         lambda: h @ dense_down),
        ("up dgrad", 2 * R * 2 * Fh * H,
         lambda: mk.grouped_gemm(grad_up, w_up, counts, trans_b=True),
         lambda: mk.grouped_gemm(grad_up, w_up, counts, trans_b=True, backend="cublas"),
         lambda: ref.grouped_gemm(grad_up, w_up, counts, trans_b=True),
         supported(lambda: grouped_mm(grad_up, up_t, counts)),
         lambda: grad_up @ dense_up.t()),
        ("up wgrad", 2 * R * H * 2 * Fh,
         lambda: mk.grouped_gemm_wgrad(rows, grad_up, counts),
         lambda: mk.grouped_gemm_wgrad(rows, grad_up, counts, backend="cublas"),
         lambda: wgrad_loop(rows, grad_up, counts),
         supported(lambda: grouped_mm_wgrad(rows, grad_up, counts)),
         lambda: rows.t() @ grad_up),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per batch (16384 on cuda, 1024 on cpu)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--loads", nargs="+", default=["uniform", "skewed"])
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    num_tokens = args.tokens or (16384 if device == "cuda" else 1024)

    def tflops(flops: int, fn: Callable[[], object] | None) -> float | None:
        if fn is None:
            return None
        return flops / measure(fn, device, repeats=args.repeats).median_ms / 1e9

    results = []
    for name in args.models:
        model = MODELS[name]
        for load in args.loads:
            counts = routed_counts(model, num_tokens, load, device)
            rows = torch.randn(int(counts.sum()), model.hidden).to(device, dtype)
            sizes = counts.float()
            for op, flops, *fns in cases(model, rows, counts, device, dtype):
                ours, library, loop, gmm, dense = (tflops(flops, fn) for fn in fns)
                row = {
                    "model": name,
                    "load": load,
                    "op": op,
                    "rows_per_expert": f"{sizes.min():.0f}/{sizes.median():.0f}/{sizes.max():.0f}",
                    "ours_TFLOPs": ours,
                    "library_loop_TFLOPs": library,
                    "python_loop_TFLOPs": loop,
                    "grouped_mm_TFLOPs": gmm,
                    "dense_TFLOPs": dense,
                    "of_dense": ours / dense,
                    "vs_library_loop": ours / library,
                    "vs_grouped_mm": ours / gmm if gmm else None,
                }
                results.append(row)
                print(row, flush=True)
    for row in results:
        row["tokens"] = num_tokens
    save(
        f"bench_grouped_gemm_{device}_{args.dtype}",
        results,
        [
            "model",
            "load",
            "op",
            "rows_per_expert",
            "ours_TFLOPs",
            "library_loop_TFLOPs",
            "python_loop_TFLOPs",
            "grouped_mm_TFLOPs",
            "dense_TFLOPs",
            "of_dense",
            "vs_library_loop",
            "vs_grouped_mm",
        ],
        f"Grouped GEMM, TFLOP/s ({device}, {args.dtype}, {num_tokens} tokens; rows per expert "
        "min/median/max)",
    )


if __name__ == "__main__":
    main()
