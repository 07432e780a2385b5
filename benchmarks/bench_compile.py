"""A training step of moe-train's model, eager against torch.compile(fullgraph=True), in one run.

    python benchmarks/bench_compile.py [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 7]
                                       [--preset tiny|small] [--out DIR] [--smoke]

The step is what ``moe_kernels.train.loop.train_step`` does for one micro-batch: forward, the
language-model loss plus the layers' aux losses, backward, AdamW, and the loss-free bias
update. "compiled" compiles the forward and loss with ``torch.compile(fullgraph=True)`` (the
default Inductor backend: AOTAutograd compiles the backward too); the optimizer step and the
bias update run eagerly in both. Both models start from the same weights; the script checks
that the first step's losses agree (fp32: rtol 1e-5) before timing. Timed in turns
(``timer.measure_in_turns``), medians in ms, after a warm-up that includes the compilation (its
time is reported apart). Writes <out>/bench_compile_<device>_<dtype>.json and .md.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from moe_kernels.layer import total_aux_loss, update_balance
from moe_kernels.train.config import PRESETS, ModelConfig
from moe_kernels.train.loop import make_optimizer
from moe_kernels.train.model import MoETransformer, language_model_loss
from timer import DTYPES, measure_in_turns, parse, parser, save

SMOKE_MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                          num_experts=8, topk=2, expert_ffn_hidden_size=16, max_seq_len=16)  # fmt: skip


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = language_model_loss(logits, tokens[:, 1:])
    aux = total_aux_loss(model)
    return loss if aux is None else loss + aux


def stepper(model, forward, tokens, config, dtype):
    optimizer = make_optimizer(model, config)

    def step() -> float:
        with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_balance(model)
        return float(loss.detach())

    return step


def main() -> None:
    p = parser(__doc__, DTYPES, "fp32", repeats=7)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    args = parse(p)
    dtype = DTYPES[args.dtype]
    config = PRESETS[args.preset]
    if args.smoke:
        config = dataclasses.replace(config, model=SMOKE_MODEL, micro_batch_size=2, seq_len=15)
    torch.manual_seed(0)
    eager = MoETransformer(config).to(args.device)
    model = copy.deepcopy(eager)
    tokens = torch.randint(0, config.model.vocab_size, (config.micro_batch_size, config.seq_len + 1),
                           generator=torch.Generator().manual_seed(1)).to(args.device)  # fmt: skip
    steps = {
        "eager": stepper(eager, loss_of, tokens, config, dtype),
        "compiled": stepper(model, torch.compile(loss_of, fullgraph=True), tokens, config, dtype),
    }
    first_eager = steps["eager"]()
    begin = time.perf_counter()
    first_compiled = steps["compiled"]()
    compile_s = time.perf_counter() - begin
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if abs(first_compiled - first_eager) > tolerance * abs(first_eager):
        raise SystemExit(f"compiled loss {first_compiled} != eager {first_eager}: not timing")
    timings = measure_in_turns(steps, args.device, repeats=dict.fromkeys(steps, args.repeats))
    tokens_per_step = config.micro_batch_size * config.seq_len
    row = {
        "preset": "smoke" if args.smoke else args.preset,
        "tokens": tokens_per_step,
        "eager_ms": timings["eager"].median_ms,
        "compiled_ms": timings["compiled"].median_ms,
        "speedup": timings["eager"].median_ms / timings["compiled"].median_ms,
        "first_compiled_step_s": compile_s,
        "eager_min_ms": timings["eager"].min_ms,
        "compiled_min_ms": timings["compiled"].min_ms,
    }
    save(
        f"bench_compile_{args.device}_{args.dtype}",
        [row],
        ["preset", "tokens", "eager_ms", "compiled_ms", "speedup", "first_compiled_step_s"],
        f"A training step of moe-train's model, eager and torch.compile(fullgraph=True) "
        f"({args.device}, {args.dtype}, medians of {args.repeats} in turns)",
        args.out,
    )


if __name__ == "__main__":
    main()
