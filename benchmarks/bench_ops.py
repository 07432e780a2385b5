"""Each op of the package against the pure-PyTorch reference composition, in the same run.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                                   [--shape small|qwen3-moe|deepseek-v3] [--tokens N]
                                   [--repeats 7] [--out DIR] [--smoke]

Shapes: "small" (the default), a small DeepSeek-V3-style MoE layer (64 experts, top-6 of 8
groups keeping 4, hidden 1024, expert FFN 512, 4096 tokens); the MoE layers of real models for
a GPU: "qwen3-moe" (Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, FFN 768, 16384 tokens) and
"deepseek-v3" (256 experts, top-8 of 8 groups keeping 4, hidden 7168, FFN 2048, 8192 tokens;
its experts take 22 GB in bf16, and in fp32, with the reference's gradients of them (per
expert, then stacked), an estimated 135 GB: bf16 only). Routing scores are sigmoids (and
sqrtsoftplus in one row); token-choice capacity, where a row drops, is the fair share
(capacity factor 1, pairs of lowest weight dropped, or the last by position); 8
expert-parallel ranks for transpose_segments; the router logits are fp32 whatever the model
dtype. Prints a table and writes <out>/bench_ops_<device>_<dtype>[_<shape>].json and .md
(``--out``, default benchmarks/results).

"speedup" is the reference's median time over ours (above 1: we are faster). The backward rows
time the backward alone of a forward already run (autograd from the op's outputs, for ours
and for the reference). The memory-bound ops report the bandwidth of the bytes they must move
at least ("GBps") and its fraction of the bandwidth of a plain 512 MB device copy measured in
the same run ("of_copy_peak": near 1, the op runs at the speed of memory; ops on a few KB, as
update_bias, are bound by the launch, not by memory). The grouped GEMM also runs against
torch._grouped_mm where this torch has it for the device and dtype, and the GEMM-bound rows
against dense matrix products of equal FLOPs ("dense_over_ours" near 1: the op costs what its
FLOPs cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from bench_grouped_gemm import grouped_mm

import moe_kernels as mk
from moe_kernels import reference as ref
from timer import (
    DTYPES,
    measure,
    measure_in_turns,
    parse,
    parser,
    randn,
    save,
    sized,
    supported,
    unit,
)


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


SHAPES = {
    "small": Shape(),
    "qwen3-moe": Shape(16384, hidden=2048, ffn=768, num_experts=128, topk=8, n_groups=1,
                       topk_groups=1),
    "deepseek-v3": Shape(8192, hidden=7168, ffn=2048, num_experts=256, topk=8),
}  # fmt: skip


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


def copy_bandwidth_gbps(device: str, repeats: int, num_bytes: int) -> float:
    """GB/s of a device-to-device copy of ``num_bytes`` (half read, half written): the practical
    peak of memory bandwidth on this machine."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, repeats=repeats).median_ms
    return num_bytes / ms / 1e6


def backward(outputs, inputs, grads) -> Callable[[], object]:
    """The backward alone of a forward already run, from ``outputs`` to ``inputs``; the graph is
    kept for the next repeat."""
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_()


def expert_ffn(impl, x, logits, bias, w_gate_up, w_down, shape: Shape, capacity=None):
    """Route -> permute -> SwiGLU experts -> unpermute, with ``impl`` = moe_kernels or reference;
    with a ``capacity``, each expert keeps its pairs of highest weight up to it."""
    weights, ids, _ = impl.biased_topk(
        logits, bias, shape.topk, "sigmoid", shape.n_groups, shape.topk_groups
    )
    if capacity is not None:
        ids, _, _ = impl.drop_over_capacity(ids, weights, shape.num_experts, capacity, "probs")
    rows, row_map, counts = impl.permute(x, ids, shape.num_experts)
    y = impl.grouped_gemm(impl.grouped_gemm_swiglu(rows, w_gate_up, counts), w_down, counts)
    return impl.unpermute(y, row_map, weights)


def dense_ffn(rows, w_gate_up, w_down):
    """The same expert FFN as one dense matrix product per projection, on already-permuted
    rows: the GEMM time of the layer's FLOPs, the floor a fused layer aims for."""
    gate, up = (rows @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def main() -> None:
    p = parser(__doc__, DTYPES, dtype="fp32", repeats=7)
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    args = parse(p)
    shape = sized(SHAPES[args.shape], args)
    dev, dtype = args.device, DTYPES[args.dtype]
    g = torch.Generator(dev).manual_seed(0)
    T, H, Fh, E, k = shape.num_tokens, shape.hidden, shape.ffn, shape.num_experts, shape.topk
    logits = randn(T, E, generator=g, dtype=torch.float32)
    bias = randn(E, generator=g, dtype=torch.float32, scale=0.1)
    x = randn(T, H, generator=g, dtype=dtype)
    weights, ids, counts = mk.biased_topk(
        logits, bias, k, "sigmoid", shape.n_groups, shape.topk_groups
    )
    rows, row_map, _ = mk.permute(x, ids, E)
    w_gate_up = randn(E, H, 2 * Fh, generator=g, dtype=dtype, scale=H**-0.5)
    w_down = randn(E, Fh, H, generator=g, dtype=dtype, scale=Fh**-0.5)
    h = randn(rows.shape[0], Fh, generator=g, dtype=dtype)
    pre = randn(rows.shape[0], 2 * Fh, generator=g, dtype=dtype)  # [gate | up]

    def fwd_bwd(impl, capacity=None):
        xx, ll, wg, wd = (leaf(t) for t in (x, logits, w_gate_up, w_down))
        expert_ffn(impl, xx, ll, bias, wg, wd, shape, capacity).sum().backward()

    # Token-choice capacity at the fair share (factor 1): a skewed batch drops pairs.
    capacity = mk.expert_capacity(T, k, E, 1.0)

    dense_weights = (w_gate_up[0], w_down[0])

    def dense_fwd_bwd():
        dense_ffn(*(leaf(t) for t in (rows, *dense_weights))).sum().backward()

    topk_args = (k, "sigmoid", shape.n_groups, shape.topk_groups)
    sqrtsoftplus_args = (k, "sqrtsoftplus", shape.n_groups, shape.topk_groups)
    out = torch.empty_like(x)
    # Each implementation updates its own copy of the bias in place, repeat after repeat.
    our_bias, ref_bias = bias.clone(), bias.clone()
    # The permuted rows as an expert-parallel rank of ep_size ranks would receive them, grouped
    # by (source rank, local expert); counts of the whole layer stand in for the received ones.
    segment_counts = counts.view(shape.ep_size, -1)
    # Leaves and output gradients of the backward rows: each forward runs once, before timing.
    ll, xx, rr, ww = leaf(logits), leaf(x), leaf(rows), leaf(weights)
    grad_weights, grad_rows, grad_out = (torch.randn_like(t) for t in (weights, rows, x))

    def backwards(impl):
        return {
            "biased_topk": backward(impl.biased_topk(ll, bias, *topk_args)[0], ll, grad_weights),
            "permute": backward(impl.permute(xx, ids, E)[0], xx, grad_rows),
            "unpermute": backward(impl.unpermute(rr, row_map, ww), (rr, ww), grad_out),
        }

    our_bwd, ref_bwd = backwards(mk), backwards(ref)
    cases = [
        Case("biased_topk", lambda: mk.biased_topk(logits, bias, *topk_args),
             lambda: ref.biased_topk(logits, bias, *topk_args),
             min_bytes=nbytes(logits, weights, ids, counts)),
        Case("biased_topk backward", our_bwd["biased_topk"], ref_bwd["biased_topk"],
             min_bytes=nbytes(grad_weights, logits, ids, logits)),
        Case("biased_topk sqrtsoftplus", lambda: mk.biased_topk(logits, bias, *sqrtsoftplus_args),
             lambda: ref.biased_topk(logits, bias, *sqrtsoftplus_args),
             min_bytes=nbytes(logits, weights, ids, counts)),
        Case("drop_over_capacity probs", lambda: mk.drop_over_capacity(ids, weights, E, capacity),
             lambda: ref.drop_over_capacity(ids, weights, E, capacity),
             min_bytes=nbytes(ids, weights, ids, ids, counts)),
        Case("drop_over_capacity position",
             lambda: mk.drop_over_capacity(ids, None, E, capacity, "position"),
             lambda: ref.drop_over_capacity(ids, None, E, capacity, "position"),
             min_bytes=nbytes(ids, ids, ids, counts)),
        Case("expert_histogram", lambda: mk.expert_histogram(ids, E),
             lambda: ref.expert_histogram(ids, E), min_bytes=nbytes(ids, counts)),
        Case("update_bias", lambda: mk.update_bias(our_bias, counts, 1e-3),
             lambda: ref.update_bias(ref_bias, counts, 1e-3),
             min_bytes=nbytes(counts, bias, bias)),
        Case("update_bias centered", lambda: mk.update_bias(our_bias, counts, 1e-3, centered=True),
             lambda: ref.update_bias(ref_bias, counts, 1e-3, centered=True),
             min_bytes=nbytes(counts, bias, bias)),
        Case("permute", lambda: mk.permute(x, ids, E), lambda: ref.permute(x, ids, E),
             min_bytes=nbytes(x, ids, rows, row_map)),
        Case("permute align=16", lambda: mk.permute(x, ids, E, 16),
             lambda: ref.permute(x, ids, E, 16), min_bytes=nbytes(x, ids, rows, row_map)),
        Case("permute backward", our_bwd["permute"], ref_bwd["permute"],
             min_bytes=nbytes(rows, row_map, x)),
        Case("unpermute", lambda: mk.unpermute(rows, row_map, weights),
             lambda: ref.unpermute(rows, row_map, weights),
             min_bytes=nbytes(rows, row_map, weights, out)),
        Case("unpermute backward", our_bwd["unpermute"], ref_bwd["unpermute"],
             min_bytes=nbytes(grad_out, rows, row_map, weights, rows, weights)),
        Case(f"transpose_segments {shape.ep_size}x{E // shape.ep_size}",
             lambda: mk.transpose_segments(rows, segment_counts),
             lambda: ref.transpose_segments(rows, segment_counts),
             min_bytes=2 * nbytes(rows) + nbytes(segment_counts)),
        Case("swiglu_backward", lambda: mk.swiglu_backward(h, pre),
             lambda: ref.swiglu_backward(h, pre), min_bytes=nbytes(h, pre, pre)),
        Case("grouped_gemm [R,F]x[E,F,H]", lambda: mk.grouped_gemm(h, w_down, counts),
             lambda: ref.grouped_gemm(h, w_down, counts),
             grouped_mm=supported(lambda: grouped_mm(h, w_down, counts)),
             dense=lambda: h @ w_down[0]),
        Case("MoE FFN forward",
             lambda: expert_ffn(mk, x, logits, bias, w_gate_up, w_down, shape),
             lambda: expert_ffn(ref, x, logits, bias, w_gate_up, w_down, shape),
             dense=lambda: dense_ffn(rows, *dense_weights)),
        Case("MoE FFN forward+backward", lambda: fwd_bwd(mk), lambda: fwd_bwd(ref),
             dense=dense_fwd_bwd),
        Case("MoE FFN forward+backward, capacity 1.0",
             lambda: fwd_bwd(mk, capacity), lambda: fwd_bwd(ref, capacity)),
    ]  # fmt: skip
    copy_bytes = (16 if args.smoke else 512) * 1024 * 1024
    copy_gbps = copy_bandwidth_gbps(dev, args.repeats, copy_bytes)
    print(f"device copy: {copy_gbps:.1f} GB/s", flush=True)
    results, failed = [], []
    for case in cases:
        with unit(case.name, failed):
            results.append(time_case(case, dev, args.repeats, copy_gbps))
            print(results[-1], flush=True)
    for row in results:
        row["shape"] = asdict(shape)
        row["copy_GBps"] = copy_gbps
    save(
        f"bench_ops_{dev}_{args.dtype}" + ("" if args.shape == "small" else f"_{args.shape}"),
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
        f"moe_kernels ops vs the pure-PyTorch reference ({dev}, {args.dtype}, {args.shape}: "
        f"{shape})",
        args.out,
        failed,
    )


def time_case(case: Case, dev: str, repeats: int, copy_gbps: float) -> dict[str, object]:
    fns = {"ours": case.ours, "reference": case.reference}
    fns |= {"grouped_mm": case.grouped_mm} if case.grouped_mm is not None else {}
    fns |= {"dense_equal_flops": case.dense} if case.dense is not None else {}
    ms = {
        name: timing.median_ms
        for name, timing in measure_in_turns(fns, dev, repeats=dict.fromkeys(fns, repeats)).items()
    }
    t_ours = ms["ours"]
    row = {"op": case.name, **{f"{name}_ms": value for name, value in ms.items()}}
    row["speedup"] = ms["reference"] / t_ours
    if case.min_bytes is not None:
        row["GBps"] = case.min_bytes / t_ours / 1e6
        row["of_copy_peak"] = row["GBps"] / copy_gbps
    if case.grouped_mm is not None:
        row["speedup_vs_grouped_mm"] = ms["grouped_mm"] / t_ours
    if case.dense is not None:
        row["dense_over_ours"] = ms["dense_equal_flops"] / t_ours
    return row


if __name__ == "__main__":
    main()
