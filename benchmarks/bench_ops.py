"""Each op of the package against the pure-PyTorch reference composition, in the same run.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--tokens 4096]

Shapes of a small DeepSeek-V3-style MoE layer (64 experts, top-6 of 8 groups keeping 4,
hidden 1024, expert FFN 512; 8 expert-parallel ranks for transpose_segments); the router logits are fp32 whatever the model dtype. Prints a
table and writes results/bench_ops_<device>_<dtype>.json and .md. "speedup" is the
reference's median time over ours (above 1: we are faster). The memory-bound ops report the
bandwidth of the bytes they must move at least ("GBps") and its fraction of the bandwidth of
a plain 512 MB device copy measured in the same run ("of_copy_peak": near 1, the op runs at
the speed of memory). The grouped GEMM also runs against torch._grouped_mm where this torch
has it for the device, and the GEMM-bound rows against dense matrix products of equal FLOPs
("dense_over_ours" near 1: the op costs what its FLOPs cost).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference as ref
from timer import measure, save

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    num_tokens: int = 4096
    hidden: int = 1024
    ffn: int = 512
    num_experts: int = 64
    topk: int = 6
    n_groups: int = 8
    topk_groups: int = 4
    ep_size: int = 8  # expert-parallel ranks, for transpose_segments' grid


@dataclass(frozen=True)
class Case:
    """One op timed against its baselines: the reference composition always; torch._grouped_mm
    and dense GEMMs of equal FLOPs where they apply."""

    name: str
    ours: Callable[[], object]
    reference: Callable[[], object]
    grouped_mm: Callable[[], object] | None = None
    dense: Callable[[], object] | None = None
    min_bytes: int | None = None  # bytes the op must read and write at least


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth_gbps(device: str, repeats: int) -> float:
    """GB/s of a 512 MB device-to-device copy (256 MB read, 256 MB written): the practical
    peak of memory bandwidth on this machine."""
    src = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, repeats=repeats).median_ms
    return 2 * src.numel() / ms / 1e6


def expert_ffn(impl, x, logits, bias, w_gate_up, w_down, shape: Shape):
    """Route -> permute -> SwiGLU experts -> unpermute, with ``impl`` = moe_kernels or reference."""
    weights, ids, _ = impl.biased_topk(
        logits, bias, shape.topk, "sigmoid", shape.n_groups, shape.topk_groups
    )
    rows, row_map, counts = impl.permute(x, ids, shape.num_experts)
    y = impl.grouped_gemm(impl.grouped_gemm_swiglu(rows, w_gate_up, counts), w_down, counts)
    return impl.unpermute(y, row_map, weights)


def dense_ffn(rows, w_gate_up, w_down):
    """The same expert FFN as one dense matrix product per projection, on already-permuted
    rows: the GEMM time of the layer's FLOPs, the floor a fused layer aims for."""
    gate, up = (rows @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def grouped_mm_baseline(device: str):
    """torch._grouped_mm (offsets are cumulative int32 row ends), or None where unsupported."""
    if not hasattr(torch, "_grouped_mm"):
        return None

    def run(a, b, counts):
        return torch._grouped_mm(a, b, offs=torch.cumsum(counts, 0, dtype=torch.int32))

    try:
        run(
            torch.randn(4, 8, device=device),
            torch.randn(2, 8, 8, device=device),
            torch.tensor([1, 3], device=device),
        )
    except (RuntimeError, NotImplementedError):
        return None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=Shape.num_tokens)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    shape = Shape(num_tokens=args.tokens)
    dev, dtype = args.device, DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    T, H, Fh, E, k = shape.num_tokens, shape.hidden, shape.ffn, shape.num_experts, shape.topk
    logits = torch.randn(T, E, generator=g).to(dev)
    bias = (torch.randn(E, generator=g) * 0.1).to(dev)
    x = torch.randn(T, H, generator=g).to(dev, dtype)
    weights, ids, counts = mk.biased_topk(
        logits, bias, k, "sigmoid", shape.n_groups, shape.topk_groups
    )
    rows, row_map, _ = mk.permute(x, ids, E)
    w_gate_up = (torch.randn(E, H, 2 * Fh, generator=g) / H**0.5).to(dev, dtype)
    w_down = (torch.randn(E, Fh, H, generator=g) / Fh**0.5).to(dev, dtype)
    h = torch.randn(rows.shape[0], Fh, generator=g).to(dev, dtype)
    grouped_mm = grouped_mm_baseline(dev)

    def fwd_bwd(impl):
        params = [p.detach().requires_grad_() for p in (x, logits, w_gate_up, w_down)]
        xx, ll, wg, wd = params
        expert_ffn(impl, xx, ll, bias, wg, wd, shape).sum().backward()

    dense_weights = (w_gate_up[0], w_down[0])

    def dense_fwd_bwd():
        params = [p.detach().requires_grad_() for p in (rows, *dense_weights)]
        dense_ffn(*params).sum().backward()

    topk_args = (k, "sigmoid", shape.n_groups, shape.topk_groups)
    out = torch.empty_like(x)
    # The permuted rows as an expert-parallel rank of ep_size ranks would receive them, grouped
    # by (source rank, local expert); counts of the whole layer stand in for the received ones.
    segment_counts = counts.view(shape.ep_size, -1)
    cases = [
        Case("biased_topk", lambda: mk.biased_topk(logits, bias, *topk_args),
             lambda: ref.biased_topk(logits, bias, *topk_args),
             min_bytes=nbytes(logits, weights, ids, counts)),
        Case("expert_histogram", lambda: mk.expert_histogram(ids, E),
             lambda: ref.expert_histogram(ids, E), min_bytes=nbytes(ids, counts)),
        Case("update_bias", lambda: mk.update_bias(bias.clone(), counts, 1e-3),
             lambda: ref.update_bias(bias.clone(), counts, 1e-3)),
        Case("permute", lambda: mk.permute(x, ids, E), lambda: ref.permute(x, ids, E),
             min_bytes=nbytes(x, ids, rows, row_map)),
        Case("permute align=16", lambda: mk.permute(x, ids, E, 16),
             lambda: ref.permute(x, ids, E, 16), min_bytes=nbytes(x, ids, rows, row_map)),
        Case("unpermute", lambda: mk.unpermute(rows, row_map, weights),
             lambda: ref.unpermute(rows, row_map, weights),
             min_bytes=nbytes(rows, row_map, weights, out)),
        Case(f"transpose_segments {shape.ep_size}x{E // shape.ep_size}",
             lambda: mk.transpose_segments(rows, segment_counts),
             lambda: ref.transpose_segments(rows, segment_counts),
             min_bytes=2 * nbytes(rows) + nbytes(segment_counts)),
        Case("grouped_gemm [R,F]x[E,F,H]", lambda: mk.grouped_gemm(h, w_down, counts),
             lambda: ref.grouped_gemm(h, w_down, counts),
             grouped_mm=(lambda: grouped_mm(h, w_down, counts)) if grouped_mm else None,
             dense=lambda: h @ w_down[0]),
        Case("MoE FFN forward",
             lambda: expert_ffn(mk, x, logits, bias, w_gate_up, w_down, shape),
             lambda: expert_ffn(ref, x, logits, bias, w_gate_up, w_down, shape),
             dense=lambda: dense_ffn(rows, *dense_weights)),
        Case("MoE FFN forward+backward", lambda: fwd_bwd(mk), lambda: fwd_bwd(ref),
             dense=dense_fwd_bwd),
    ]  # fmt: skip
    results = []
    copy_gbps = copy_bandwidth_gbps(dev, args.repeats)
    print(f"device copy: {copy_gbps:.1f} GB/s", flush=True)
    for case in cases:
        t_ours = measure(case.ours, dev, repeats=args.repeats).median_ms
        t_ref = measure(case.reference, dev, repeats=args.repeats).median_ms
        row = {"op": case.name, "ours_ms": t_ours, "reference_ms": t_ref, "speedup": t_ref / t_ours}
        if case.min_bytes is not None:
            row["GBps"] = case.min_bytes / t_ours / 1e6
            row["of_copy_peak"] = row["GBps"] / copy_gbps
        if case.grouped_mm is not None:
            row["grouped_mm_ms"] = measure(case.grouped_mm, dev, repeats=args.repeats).median_ms
            row["speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / t_ours
        if case.dense is not None:
            row["dense_equal_flops_ms"] = measure(case.dense, dev, repeats=args.repeats).median_ms
            row["dense_over_ours"] = row["dense_equal_flops_ms"] / t_ours
        results.append(row)
        print(row, flush=True)
    for row in results:
        row["shape"] = asdict(shape)
        row["copy_GBps"] = copy_gbps
    save(
        f"bench_ops_{dev}_{args.dtype}",
        results,
        [
            "op",
            "ours_ms",
            "reference_ms",
            "speedup",
            "GBps",
            "of_copy_peak",
            "grouped_mm_ms",
            "speedup_vs_grouped_mm",
            "dense_equal_flops_ms",
            "dense_over_ours",
        ],
        f"moe_kernels ops vs the pure-PyTorch reference ({dev}, {args.dtype}, {shape})",
    )


if __name__ == "__main__":
    main()
