"""MoELayer against transformers' DeepseekV3MoE and a pure-PyTorch composition, in one run.

    python benchmarks/bench_layer.py [--device cpu|cuda] [--dtype fp32|bf16] [--shape NAME ...]
                                     [--tokens N] [--repeats 5] [--eager-repeats 2]
                                     [--keep-freed-memory] [--out DIR] [--smoke]

One MoE block, forward and forward+backward, four implementations of the same computation with
the same weights (transformers' parameters copied into MoELayer):
  - "moe_kernels": ``MoELayer(balancing="loss_free", score_fn="sigmoid", ...)``, in train mode
    for forward+backward (so the balancer counts, as in training);
  - "transformers_eager": ``DeepseekV3MoE`` with ``config._experts_implementation = "eager"``,
    the Python loop over experts that a block built alone runs;
  - "transformers_grouped_mm": the same block with ``"grouped_mm"`` (a sort, then
    ``F.grouped_mm``), the default inside a transformers model;
  - "pure_torch": the best plain-PyTorch composition we found: DeepSeek's routing (sigmoid,
    biased group-limited top-k, gather), an argsort permute (one index_select, split per
    expert), one ``F.linear`` per projection and expert over weights unbound once per forward,
    SwiGLU, and each expert's weighted rows ``index_add_``-ed into one fp32 output; the shared
    expert dense;
  - "dense": ``torch.mm`` products of equal FLOPs: the T * k routed rows times one [2F, H]
    and one [H, F] weight, plus the shared expert's two products on all T tokens (forward);
    the same under autograd, with dgrad and wgrad (forward+backward). No routing, gather,
    activation or combine: the GEMM time of the layer's FLOPs, the ceiling.
"forward" runs under ``torch.no_grad()`` (MoELayer in eval mode); "forward+backward" is a
forward with gradients then ``out.backward(grad)`` for a fixed random ``grad``, gradients of
the input and every parameter set to None before each repeat. Before timing, the script checks
that every implementation gives transformers' eager output and input gradient (fp32: allclose
rtol 1e-4, atol 1e-5; bf16: relative error norm below 2e-2), or grouped_mm's when
``--eager-repeats 0`` skips the eager loop (whose backward gives each expert's slice of the
weights a gradient the size of all experts: at 256 experts of DeepSeek-V3's size, by estimate
seconds and tens of GB per backward on a GPU); a shape that does not match is not timed, and
the script exits non-zero.

``--keep-freed-memory`` calls ``moe_kernels.keep_freed_memory()`` first (glibc malloc then
serves large blocks from its heap and keeps freed memory, as moe-train does on the CPU): every
implementation runs under it alike, and the fresh pages of the many 50-400 MB buffers a block
creates per step stop costing a page fault each.

Shapes: "deepseek-v3" (hidden 1024, expert FFN 512, 64 experts, top-6 of 8 groups keeping 4,
1 shared expert, routed scaling 2.5, 4096 tokens) and "mixtral" (hidden 1024, FFN 3584,
8 experts, top-2, 2048 tokens, no shared expert: DeepseekV3MoE accepts n_shared_experts=0 and
builds a shared MLP of intermediate size 0, which adds zeros), the two run by default; and
for a GPU, the MoE layers of real models at their real sizes: "deepseek-v3-671b" (hidden 7168,
expert FFN 2048, 256 experts, top-8 of 8 groups keeping 4, 1 shared expert, routed scaling
2.5, 4096 tokens), "qwen3-30b-a3b" (hidden 2048, FFN 768, 128 experts, top-8, 8192 tokens) and
"mixtral-8x7b" (hidden 4096, FFN 14336, 8 experts, top-2, 4096 tokens), here all routed as
DeepSeek-V3 routes (bench_transformers.py runs each in its own family's block). The loss-free
bias is random (scale 0.1), so the bias changes the routing. Weights are made on the device.

The implementations of a pass are timed in turns (``timer.measure_in_turns``: one call of
each per round), so the machine's slow stretches fall on all of them alike; each makes
``--repeats`` calls, but for transformers' eager loop in forward+backward, whose backward takes
seconds: ``--eager-repeats`` there (its rounds are then the first ones only). Columns: medians
in ms; "dense_over_ours" is dense_ms / moe_kernels_ms (the fraction of the
dense-GEMM ceiling the layer reaches); "speedup_vs_X" is X's time over ours (above 1: we are
faster). Writes <out>/bench_layer_<device>_<dtype>.json and .md (the JSON adds FLOPs,
GFLOP/s, minimum times, repeats, and "interference": the CPU seconds other processes used and
the hypervisor stole while the row was timed; re-run when they are not near 0).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from moe_kernels.layer import MoELayer
from moe_kernels.memory import keep_freed_memory
from timer import DTYPES, Timing, measure_in_turns, parse, parser, randn, save, sized, unit


@dataclass(frozen=True)
class Shape:
    name: str
    num_tokens: int
    hidden: int
    ffn: int
    num_experts: int
    topk: int
    n_groups: int = 1
    topk_groups: int = 1
    n_shared: int = 0
    route_scale: float = 1.0
    family: str = "deepseek_v3"  # whose block bench_transformers.py runs

    def flops(self) -> int:
        """Forward GEMM FLOPs: routed rows x [gate | up] and x down, shared expert on all."""
        routed = 2 * self.num_tokens * self.topk * 3 * self.ffn * self.hidden
        shared = 2 * self.num_tokens * 3 * self.n_shared * self.ffn * self.hidden
        return routed + shared


SHAPES = {
    s.name: s
    for s in [
        Shape("deepseek-v3", num_tokens=4096, hidden=1024, ffn=512, num_experts=64, topk=6,
              n_groups=8, topk_groups=4, n_shared=1, route_scale=2.5),
        Shape("mixtral", num_tokens=2048, hidden=1024, ffn=3584, num_experts=8, topk=2,
              family="mixtral"),
    ]
}  # fmt: skip
# Real models' MoE layers, for a GPU (bench_transformers.py runs them too).
MODEL_SHAPES = {
    s.name: s
    for s in [
        Shape("deepseek-v3-671b", num_tokens=4096, hidden=7168, ffn=2048, num_experts=256,
              topk=8, n_groups=8, topk_groups=4, n_shared=1, route_scale=2.5),
        Shape("qwen3-30b-a3b", num_tokens=8192, hidden=2048, ffn=768, num_experts=128, topk=8,
              family="qwen3_moe"),
        Shape("qwen3-next-80b-a3b", num_tokens=8192, hidden=2048, ffn=512, num_experts=512,
              topk=10, n_shared=1, family="qwen3_next"),
        Shape("gpt-oss-20b", num_tokens=4096, hidden=2880, ffn=2880, num_experts=32, topk=4,
              family="gpt_oss"),
        Shape("llama4-scout", num_tokens=4096, hidden=5120, ffn=8192, num_experts=16, topk=1,
              n_shared=1, family="llama4"),
        Shape("mixtral-8x7b", num_tokens=4096, hidden=4096, ffn=14336, num_experts=8, topk=2,
              family="mixtral"),
    ]
}  # fmt: skip


def build(shape: Shape, device: str, dtype: torch.dtype) -> tuple[DeepseekV3MoE, MoELayer]:
    """A DeepseekV3MoE with random weights and loss-free bias, and a MoELayer holding the same
    values (DeepseekV3MoE leaves its experts uninitialised when built alone)."""
    config = DeepseekV3Config(
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.ffn,
        n_routed_experts=shape.num_experts,
        num_experts_per_tok=shape.topk,
        n_group=shape.n_groups,
        topk_group=shape.topk_groups,
        n_shared_experts=shape.n_shared,
        routed_scaling_factor=shape.route_scale,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    # Made on the device: a real model's experts would take minutes on the CPU.
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n_shared_experts=0: zero-element tensors
        hf = DeepseekV3MoE(config)
    g = torch.Generator(device).manual_seed(0)
    E, H, Fh, Fs = shape.num_experts, shape.hidden, shape.ffn, shape.n_shared * shape.ffn

    def init(tensor: Tensor, scale: float) -> None:
        tensor.normal_(0, scale, generator=g)

    with torch.no_grad():
        init(hf.gate.weight, H**-0.5)
        init(hf.gate.e_score_correction_bias, 0.1)
        init(hf.experts.gate_up_proj, H**-0.5)
        init(hf.experts.down_proj, Fh**-0.5)
        for linear in (hf.shared_experts.gate_proj, hf.shared_experts.up_proj):
            init(linear.weight, H**-0.5)
        init(hf.shared_experts.down_proj.weight, max(Fs, 1) ** -0.5)
    hf.to(dtype)
    with torch.device(device):
        layer = MoELayer(
            H,
            Fh,
            E,
            shape.topk,
            balancing="loss_free",
            score_fn="sigmoid",
            n_groups=shape.n_groups,
            topk_groups=shape.topk_groups,
            normalize=True,
            route_scale=shape.route_scale,
            num_shared_experts=shape.n_shared,
        )
    layer.to(dtype)  # the router weight and the bias stay fp32
    with torch.no_grad():
        layer.router.weight.copy_(hf.gate.weight)
        layer.balancer.bias.copy_(hf.gate.e_score_correction_bias)
        layer.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        layer.experts.down_proj.copy_(hf.experts.down_proj)
        if layer.shared_experts is not None:
            shared = hf.shared_experts
            layer.shared_experts.gate_up_proj.copy_(
                torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
            )
            layer.shared_experts.down_proj.copy_(shared.down_proj.weight)
    return hf, layer


def transformers_block(hf: DeepseekV3MoE, implementation: str) -> Callable[[Tensor], Tensor]:
    """The block with its experts implementation set before each call (the experts read
    ``config._experts_implementation`` at every forward)."""

    def run(x: Tensor) -> Tensor:
        hf.config._experts_implementation = implementation
        return hf(x)

    return run


def pure_torch_moe(layer: MoELayer, x: Tensor) -> Tensor:
    """MoELayer's computation in plain PyTorch ops over the layer's own parameters."""
    router, T = layer.router, x.shape[0]
    E, k, G = layer.num_experts, layer.topk, router.n_groups
    scores = F.linear(x.float(), router.weight).sigmoid()
    choice = scores.detach() + layer.balancer.bias
    if G > 1:
        grouped = choice.view(T, G, E // G)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(router.topk_groups, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~mask.unsqueeze(-1), -math.inf).view(T, E)
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(-1, keepdim=True) * router.route_scale
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    experts = zip(
        x.index_select(0, token).split(counts),
        token.split(counts),
        weights.flatten()[order].split(counts),
        layer.experts.gate_up_proj.unbind(0),
        layer.experts.down_proj.unbind(0),
        strict=True,
    )
    # Per expert, weighted into one fp32 output: the temporaries stay small (a few MB, reused
    # by the allocator), where a cat of all rows and a weighting pass over them cost more.
    out = x.new_zeros(x.shape, dtype=torch.float32)
    for rows_e, token_e, weights_e, gate_up, down in experts:
        gate, up = F.linear(rows_e, gate_up).chunk(2, dim=-1)
        rows_e = F.linear(F.silu(gate) * up, down)
        out.index_add_(0, token_e, rows_e.float() * weights_e.unsqueeze(1))
    out = out.to(x.dtype)
    if layer.shared_experts is not None:
        gate, up = F.linear(x, layer.shared_experts.gate_up_proj).chunk(2, dim=-1)
        out = out + F.linear(F.silu(gate) * up, layer.shared_experts.down_proj)
    return out


class DenseGemms:
    """torch.mm products of the layer's FLOPs on random operands: the ceiling."""

    def __init__(self, shape: Shape, device: str, dtype: torch.dtype) -> None:
        g = torch.Generator(device).manual_seed(2)
        T, H, Fh, R = shape.num_tokens, shape.hidden, shape.ffn, shape.num_tokens * shape.topk

        def rand(*size: int) -> Tensor:
            return randn(*size, generator=g, dtype=dtype)

        pairs = [(rand(R, H), rand(2 * Fh, H)), (rand(R, Fh), rand(H, Fh))]
        if shape.n_shared:
            Fs = shape.n_shared * Fh
            pairs += [(rand(T, H), rand(2 * Fs, H)), (rand(T, Fs), rand(H, Fs))]
        self.leaves = [t.requires_grad_() for pair in pairs for t in pair]
        self.pairs = pairs
        self.grads = [rand(a.shape[0], w.shape[0]) for a, w in pairs]

    def forward(self) -> list[Tensor]:
        return [torch.mm(a, w.t()) for a, w in self.pairs]

    def forward_backward(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None
        torch.autograd.backward(self.forward(), self.grads)


class OtherLoad:
    """CPU seconds the rest of the machine used while we timed (Linux /proc/stat: all busy time
    minus this process's), and the time the hypervisor stole: both near 0 on a quiet machine."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        busy = (user + nice + system + irq + softirq) / tick
        return busy, steal / tick, time.process_time()

    def seconds(self) -> dict[str, float] | None:
        end = self._now()
        if self.start is None or end is None:
            return None
        busy, steal, own = (b - a for a, b in zip(self.start, end, strict=True))
        return {"other_processes_cpu_s": max(0.0, busy - own), "steal_s": steal}


def forward_backward(module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor):
    """out, then x.grad, after a backward from zeroed (None) gradients."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad


def check(name: str, got: Tensor, want: Tensor, dtype: torch.dtype) -> str:
    """Raises unless ``got`` matches ``want``; returns the error it found."""
    err = (got.float() - want.float()).norm() / want.float().norm()
    max_abs = (got.float() - want.float()).abs().max()
    if dtype == torch.float32:
        ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    else:
        ok = bool(err < 2e-2)
    report = f"{name}: relative error {err:.2e}, max abs {max_abs:.2e}"
    if not ok:
        raise ValueError(f"mismatch, not timing unequal work: {report}")
    return report


def pass_runner(
    module: nn.Module, fn: Callable[[Tensor], Tensor], passes: str, x: Tensor, grad: Tensor
) -> Callable[[], None]:
    """One call of ``fn`` (the computation of ``module``) for one pass: "forward" under no_grad
    with ``module`` in eval mode, "forward+backward" in train mode from None gradients. The
    mode is set at every call: implementations share modules, and are timed in turns."""
    if passes == "forward":

        def run() -> None:
            module.eval()
            with torch.no_grad():
                fn(x.detach())
    else:

        def run() -> None:
            module.train()
            forward_backward(module, fn, x, grad)

    return run


def dense_runner(dense: DenseGemms, passes: str) -> Callable[[], object]:
    if passes == "forward+backward":
        return dense.forward_backward

    def run() -> None:
        with torch.no_grad():
            dense.forward()

    return run


def time_in_turns(
    runs: dict[str, Callable[[], object]], dev: str, repeats: dict[str, int]
) -> dict[str, Timing]:
    """The implementations of one pass, timed in turns (``measure_in_turns``), printed."""
    timings = measure_in_turns(runs, dev, repeats=repeats)
    for name, timing in timings.items():
        print(f"  {name}: {timing.median_ms:.1f} ms (min {timing.min_ms:.1f})", flush=True)
    return timings


def pass_repeats(
    runs: dict[str, object], passes: str, repeats: int, eager_repeats: int
) -> dict[str, int]:
    """Calls per implementation of a pass: ``repeats``, but ``eager_repeats`` for transformers'
    eager loop in forward+backward (its backward is what is slow). Its forward takes as many
    as the others: timed in the same rounds, so that a slow stretch late in the run cannot
    favour the implementation that stopped early."""
    slow = passes == "forward+backward"
    return {name: eager_repeats if slow and "eager" in name else repeats for name in runs}


def block_bench_args(
    doc: str, shapes: dict[str, Shape], default: list[str]
) -> tuple[argparse.Namespace, list[Shape]]:
    """The command line of the block benchmarks (this one and bench_transformers.py), and the
    shapes it asks for, sized by --smoke and --tokens; applies --keep-freed-memory."""
    p = parser(doc, ("fp32", "bf16"), dtype="fp32", repeats=5)
    p.add_argument("--shape", nargs="+", default=default, choices=list(shapes))
    p.add_argument(
        "--eager-repeats",
        type=int,
        default=2,
        help="repeats of transformers' eager loop in forward+backward (slow); 0 skips it",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="moe_kernels.keep_freed_memory() first (what moe-train does on the CPU), for every "
        "implementation alike; results go to <name>_kept_memory",
    )
    args = parse(p)
    if args.smoke:
        args.eager_repeats = min(args.eager_repeats, 1)
    if args.keep_freed_memory and not keep_freed_memory():
        sys.exit("--keep-freed-memory: this C library has no mallopt")
    return args, [sized(shapes[name], args) for name in args.shape]


def results_name(script: str, args: argparse.Namespace) -> str:
    return f"{script}_{args.device}_{args.dtype}" + (
        "_kept_memory" if args.keep_freed_memory else ""
    )


def timing_note(args: argparse.Namespace) -> str:
    """How a block benchmark timed, for its title."""
    eager = (
        f"{args.eager_repeats} for eager's forward+backward"
        if args.eager_repeats
        else "eager not run"
    )
    kept = ", freed memory kept by malloc" if args.keep_freed_memory else ""
    return f"medians of {args.repeats} repeats, {eager}{kept}"


def bench_shape(shape: Shape, dev: str, dtype: torch.dtype, repeats: int, eager_repeats: int):
    """Checks the implementations agree, then times them: yields one row per pass."""
    hf, layer = build(shape, dev, dtype)
    g = torch.Generator(dev).manual_seed(1)
    x = randn(shape.num_tokens, shape.hidden, generator=g, dtype=dtype).requires_grad_()
    grad = randn(*x.shape, generator=g, dtype=dtype)
    impls = {
        "moe_kernels": (layer, layer),
        "transformers_eager": (hf, transformers_block(hf, "eager")),
        "transformers_grouped_mm": (hf, transformers_block(hf, "grouped_mm")),
        "pure_torch": (layer, lambda x: pure_torch_moe(layer, x)),
    }
    if not eager_repeats:
        del impls["transformers_eager"]
    reference = "transformers_eager" if eager_repeats else "transformers_grouped_mm"
    layer.train()
    ref_out, ref_grad = forward_backward(*impls[reference], x, grad)
    for name, (module, fn) in impls.items():
        out, x_grad = forward_backward(module, fn, x, grad)
        print(f"{shape.name} {name} {check('output', out, ref_out, dtype)}")
        print(f"{shape.name} {name} {check('input grad', x_grad, ref_grad, dtype)}", flush=True)
    dense = DenseGemms(shape, dev, dtype)

    for passes in ("forward", "forward+backward"):
        print(f"{shape.name} {passes}", flush=True)
        load = OtherLoad()
        runs = {name: pass_runner(*impls[name], passes, x, grad) for name in impls}
        runs["dense"] = dense_runner(dense, passes)
        t = time_in_turns(runs, dev, pass_repeats(runs, passes, repeats, eager_repeats))
        ms = {name: timing.median_ms for name, timing in t.items()}
        interference = load.seconds()
        print(f"  while timing: {interference}", flush=True)
        flops = shape.flops() * (1 if passes == "forward" else 3)
        ours, eager = ms["moe_kernels"], ms.get("transformers_eager")
        yield {
            "shape": shape.name,
            "pass": passes,
            "transformers_eager_ms": eager,  # None when --eager-repeats 0 skipped it
            **{f"{name}_ms": value for name, value in ms.items()},
            "dense_over_ours": ms["dense"] / ours,
            "speedup_vs_grouped_mm": ms["transformers_grouped_mm"] / ours,
            "speedup_vs_eager": eager / ours if eager else None,
            "speedup_vs_pure_torch": ms["pure_torch"] / ours,
            "gemm_flops": flops,
            "moe_kernels_GFLOPs": flops / ours / 1e6,
            "dense_GFLOPs": flops / ms["dense"] / 1e6,
            **{f"{name}_min_ms": timing.min_ms for name, timing in t.items()},
            "repeats": {name: timing.repeats for name, timing in t.items()},
            "interference": interference,
            "config": asdict(shape),
        }


def main() -> None:
    args, shapes = block_bench_args(__doc__, {**SHAPES, **MODEL_SHAPES}, list(SHAPES))
    dev, dtype = args.device, DTYPES[args.dtype]
    results, failed = [], []
    for shape in shapes:
        with unit(shape.name, failed):
            for row in bench_shape(shape, dev, dtype, args.repeats, args.eager_repeats):
                results.append(row)
    save(
        results_name("bench_layer", args),
        results,
        [
            "shape",
            "pass",
            "moe_kernels_ms",
            "transformers_eager_ms",
            "transformers_grouped_mm_ms",
            "pure_torch_ms",
            "dense_ms",
            "dense_over_ours",
            "speedup_vs_grouped_mm",
            "speedup_vs_eager",
            "speedup_vs_pure_torch",
        ],
        f"MoELayer vs transformers' DeepseekV3MoE, pure PyTorch and dense GEMMs of equal FLOPs "
        f"({dev}, {args.dtype}, {timing_note(args)})",
        args.out,
        failed,
    )


if __name__ == "__main__":
    main()
