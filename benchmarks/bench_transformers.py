"""transformers' own MoE blocks before and after ``moe_kernels.integrations.transformers.patch``.

    python benchmarks/bench_transformers.py [--device cpu|cuda] [--dtype fp32|bf16]
                                            [--shape NAME ...] [--tokens N] [--repeats 5]
                                            [--eager-repeats 2] [--keep-freed-memory]
                                            [--out DIR] [--smoke]

One block per shape, built from transformers' classes with random weights (each weight
``randn * fan_in ** -0.5``, a DeepSeek bias ``0.1 * randn``), forward and forward+backward,
timed as:
  - "eager": the original block with ``config._experts_implementation = "eager"``, the Python
    loop over experts that a block built alone runs;
  - "grouped_mm": the original block with ``"grouped_mm"`` (a sort, then ``F.grouped_mm``),
    the default inside a transformers model;
  - "dense_bmm": in place of those two for a block whose experts have no implementations to
    choose (Llama 4's), its own forward: every expert on every token, one ``torch.bmm``;
  - "patched": a deep copy of the block after ``patch``, the same weights (values) and inputs;
  - "dense": ``torch.mm`` products of the block's GEMM FLOPs (``bench_layer.DenseGemms``): the
    ceiling no implementation of the block can pass.
Before timing, the script checks that the patched block and grouped_mm give eager's output and
input gradient (as ``bench_layer.check``; against grouped_mm's when ``--eager-repeats 0`` skips
eager, as bench_layer.py explains; against dense_bmm's where that is the original) on every token whose routing has no tie (bf16 logits tie
often; see ``tie_free_tokens``); a shape that does not match is not timed, and the script exits
non-zero. "forward" runs under ``torch.no_grad()`` in eval mode; "forward+backward" in train
mode, the gradients of the input and every parameter set to None before each repeat.

Shapes: "deepseek-v3" (``DeepseekV3MoE``: hidden 1024, expert FFN 512, 64 experts, top-6 of 8
groups keeping 4, 1 shared expert, 4096 tokens), "mixtral" (``MixtralSparseMoeBlock``: hidden
1024, FFN 3584, 8 experts, top-2, 2048 tokens), "qwen2-moe" (``Qwen2MoeSparseMoeBlock``: hidden
1024, FFN 256, 64 experts, top-8, a gated shared expert of FFN 1024, 4096 tokens), "qwen3-next"
(``Qwen3NextSparseMoeBlock``: hidden 1024, FFN 256, 128 experts, top-10, normalised, a gated
shared expert of FFN 256, 4096 tokens), "gpt-oss" (``GptOssMLP``: hidden 1024, FFN 1024, 32
experts, top-4, biases and the clamped alpha-SwiGLU, 2048 tokens), "llama4" (``Llama4TextMoe``:
hidden 1024, FFN 1024, 16 experts, top-1 on weighted tokens, a shared expert, 2048 tokens), the
six run by default; and for a GPU, bench_layer's real models at their real sizes, each in its
family's block: "deepseek-v3-671b" (``DeepseekV3MoE``), "qwen3-30b-a3b"
(``Qwen3MoeSparseMoeBlock``), "qwen3-next-80b-a3b" (``Qwen3NextSparseMoeBlock``), "gpt-oss-20b"
(``GptOssMLP``), "llama4-scout" (``Llama4TextMoe``) and "mixtral-8x7b"
(``MixtralSparseMoeBlock``). Weights are made on the device.

Columns: medians in ms; "speedup_vs_X" is X's time over the patched block's (above 1: patched
is faster); "dense_over_patched" the fraction of the dense ceiling the patched block reaches.
Writes <out>/bench_transformers_<device>_<dtype>[_kept_memory].json and .md.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch
from bench_layer import (
    MODEL_SHAPES,
    DenseGemms,
    OtherLoad,
    Shape,
    block_bench_args,
    check,
    dense_runner,
    forward_backward,
    pass_repeats,
    pass_runner,
    results_name,
    time_in_turns,
    timing_note,
)
from torch import Tensor, nn

from moe_kernels.integrations.transformers import patch, supported_routers
from timer import DTYPES, randn, save, unit

SHAPES = {
    s.name: s
    for s in [
        Shape("deepseek-v3", num_tokens=4096, hidden=1024, ffn=512, num_experts=64, topk=6,
              n_groups=8, topk_groups=4, n_shared=1, route_scale=2.5),
        Shape("mixtral", num_tokens=2048, hidden=1024, ffn=3584, num_experts=8, topk=2,
              family="mixtral"),
        Shape("qwen2-moe", num_tokens=4096, hidden=1024, ffn=256, num_experts=64, topk=8,
              n_shared=4, family="qwen2_moe"),
        Shape("qwen3-next", num_tokens=4096, hidden=1024, ffn=256, num_experts=128, topk=10,
              n_shared=1, family="qwen3_next"),
        Shape("gpt-oss", num_tokens=2048, hidden=1024, ffn=1024, num_experts=32, topk=4,
              family="gpt_oss"),
        Shape("llama4", num_tokens=2048, hidden=1024, ffn=1024, num_experts=16, topk=1,
              n_shared=1, family="llama4"),
    ]
}  # fmt: skip


# The original blocks' expert paths: transformers' experts implementations (a block whose
# experts have none, Llama 4's, runs its own forward: "dense_bmm", every expert on every token).
ORIGINALS = ("eager", "grouped_mm")

# family -> its config class and sparse-MoE block class.
BLOCKS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3MoE"),
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextSparseMoeBlock"),
    "gpt_oss": ("GptOssConfig", "GptOssMLP"),
    "llama4": ("Llama4TextConfig", "Llama4TextMoe"),
}


def config_options(shape: Shape) -> dict:
    """The family's config arguments that give ``shape``."""
    common = dict(hidden_size=shape.hidden, num_experts_per_tok=shape.topk, hidden_act="silu")
    if shape.family == "deepseek_v3":
        return dict(
            common,
            moe_intermediate_size=shape.ffn,
            n_routed_experts=shape.num_experts,
            n_group=shape.n_groups,
            topk_group=shape.topk_groups,
            n_shared_experts=shape.n_shared,
            routed_scaling_factor=shape.route_scale,
            norm_topk_prob=True,
        )
    if shape.family in ("mixtral", "gpt_oss", "llama4"):  # Llama 4's shared expert: one of F
        return dict(common, intermediate_size=shape.ffn, num_local_experts=shape.num_experts)
    qwen = dict(common, moe_intermediate_size=shape.ffn, num_experts=shape.num_experts)
    if shape.family == "qwen3_moe":
        return dict(qwen, norm_topk_prob=True)
    # Qwen2-MoE and Qwen3-Next: one gated shared expert (Qwen3-Next normalises the weights).
    return dict(
        qwen,
        shared_expert_intermediate_size=shape.n_shared * shape.ffn,
        norm_topk_prob=shape.family == "qwen3_next",
    )


def transformers_block(shape: Shape, device: str) -> nn.Module:
    """The family's own sparse-MoE block class, configured for ``shape``, made on ``device``."""
    config_class, block_class = BLOCKS[shape.family]
    family = importlib.import_module(f"transformers.models.{shape.family}")
    modeling = importlib.import_module(f"{family.__name__}.modeling_{shape.family}")
    config = getattr(family, config_class)(**config_options(shape))
    block = getattr(modeling, block_class)
    config._experts_implementation = "eager"
    with torch.device(device):  # a real model's experts would take minutes on the CPU
        module = block(config)
    g = torch.Generator(device).manual_seed(0)
    # gpt-oss stores its experts for x @ W ([E, H, 2F]): their fan-in is the next-to-last size.
    transposed = getattr(module.experts, "is_transposed", False)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            fan_in_dim = -2 if transposed and name.endswith(("gate_up_proj", "down_proj")) else -1
            parameter.normal_(0, parameter.shape[fan_in_dim] ** -0.5, generator=g)
        for name, buffer in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1, generator=g)
    return module


def with_experts(block: nn.Module, implementation: str | None) -> Callable[[Tensor], Tensor]:
    """The block with its experts implementation set before each call (the experts read
    ``config._experts_implementation`` at every forward; None: the patched block), returning
    its hidden states (gpt-oss's block also returns its routing weights)."""

    def run(x: Tensor) -> Tensor:
        if implementation is not None:
            block.experts.config._experts_implementation = implementation
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        return out.view(x.shape)  # Llama 4's block returns its tokens flattened

    return run


def tie_free_tokens(block: nn.Module, x: Tensor) -> Tensor:
    """[T] bool: the tokens whose k-th and (k+1)-th router logits differ. A bf16 router (Mixtral,
    Qwen) rounds logits to 8 bits, so many tokens tie at the k-th place, and which expert wins
    a tie is an arbitrary choice (this package: the lower index; torch.topk: unspecified), which
    changes that token's output; the outputs of the others must agree."""
    with torch.no_grad():
        router = next(child for child in block.children() if type(child) in supported_routers())
        out = router(x.reshape(-1, x.shape[-1]))
        logits = out[1] if len(out) == 2 else out[0]  # Llama 4's: (scores, logits)
        top = logits.float().topk(router.top_k + 1, dim=-1).values
    return top[:, -2] != top[:, -1]


def bench_shape(shape: Shape, dev: str, dtype: torch.dtype, repeats: int, eager_repeats: int):
    """Checks the implementations agree, then times them: yields one row per pass."""
    original = transformers_block(shape, dev).to(dtype)
    patched = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if patch(patched) != 1:
            raise RuntimeError(f"{shape.name}: patch did not replace the block")
    g = torch.Generator(dev).manual_seed(1)
    x = randn(1, shape.num_tokens, shape.hidden, generator=g, dtype=dtype).requires_grad_()
    grad = randn(*x.shape, generator=g, dtype=dtype)
    originals = ORIGINALS if hasattr(original.experts, "config") else ("dense_bmm",)
    impls = {
        name: (original, with_experts(original, None if name == "dense_bmm" else name))
        for name in originals
        if name != "eager" or eager_repeats
    }
    reference = next(iter(impls))
    impls["patched"] = (patched, with_experts(patched, None))
    ref_out, ref_grad = forward_backward(*impls[reference], x, grad)
    keep = tie_free_tokens(original, x)
    print(f"{shape.name}: comparing the {int(keep.sum())} of {keep.numel()} tokens without ties")
    for name in list(impls)[1:]:
        out, x_grad = forward_backward(*impls[name], x, grad)
        for what, got, want in (("output", out, ref_out), ("input grad", x_grad, ref_grad)):
            report = check(what, got[0, keep], want[0, keep], dtype)
            print(f"{shape.name} {name} vs {reference} {report}", flush=True)
    dense = DenseGemms(shape, dev, dtype)

    for passes in ("forward", "forward+backward"):
        print(f"{shape.name} {passes}", flush=True)
        load = OtherLoad()
        runs = {name: pass_runner(*impls[name], passes, x, grad) for name in impls}
        runs["dense"] = dense_runner(dense, passes)
        t = time_in_turns(runs, dev, pass_repeats(runs, passes, repeats, eager_repeats))
        ms = {name: timing.median_ms for name, timing in t.items()}
        ours = ms["patched"]
        yield {
            "shape": shape.name,
            "block": type(original).__name__,
            "pass": passes,
            # None where the block has no such path, or --eager-repeats 0 skipped it.
            **{f"{name}_ms": ms.get(name) for name in (*ORIGINALS, "dense_bmm")},
            **{f"{name}_ms": value for name, value in ms.items()},
            **{
                f"speedup_vs_{name}": ms[name] / ours if name in ms else None
                for name in (*ORIGINALS, "dense_bmm")
            },
            "dense_over_patched": ms["dense"] / ours,
            **{f"{name}_min_ms": timing.min_ms for name, timing in t.items()},
            "repeats": {name: timing.repeats for name, timing in t.items()},
            "interference": load.seconds(),
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
        results_name("bench_transformers", args),
        results,
        [
            "shape",
            "pass",
            "eager_ms",
            "grouped_mm_ms",
            "dense_bmm_ms",
            "patched_ms",
            "dense_ms",
            "speedup_vs_grouped_mm",
            "speedup_vs_eager",
            "speedup_vs_dense_bmm",
            "dense_over_patched",
        ],
        f"transformers' MoE blocks, original (eager, grouped_mm) and patched by moe_kernels "
        f"({dev}, {args.dtype}, {timing_note(args)})",
        args.out,
        failed,
    )


if __name__ == "__main__":
    main()
