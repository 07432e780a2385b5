"""The training loop: gradient accumulation, the balancer update after each optimizer step,
evaluation on held-out text, MaxVio, checkpoints, a summary and plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from .. import balance, fsdp
from .._nvtx import nvtx_range
from ..dispatch import init_nccl
from ..layer import MoELayer, moe_layers, total_aux_loss, update_balance
from ..parallel import (
    ParallelLayout,
    average_gradients,
    clip_grad_norm_,
    consolidated_state_dict,
    init_expert_parallel,
    is_sharded_expert,
    mean_over_ranks,
)
from . import data as text_data
from .atomic import atomic_write_text
from .checkpoint import (
    EXPORT_NAME,
    checkpoint_name,
    load_checkpoint,
    save_checkpoint,
    save_export,
)
from .config import TrainConfig
from .corpus import load_corpus
from .documents import default_cache_dir
from .errors import BadArgument
from .model import MoETransformer, language_model_loss
from .plots import plot_runs
from .sharded_checkpoint import (
    SHARDED_CHECKPOINT_NAME,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from .tensorboard import ScalarLog
from .tokenizer import get_tokenizer


@dataclasses.dataclass(frozen=True)
class TokenData:
    train: Tensor
    val: Tensor
    vocab_size: int
    description: str


def prepare_data(config: TrainConfig, cache_dir: Path) -> TokenData:
    """Token ids of the training and held-out text: a corpus encoded by its tokenizer (cached),
    or a pre-tokenized .npy/.bin file."""
    if config.data.endswith((".npy", ".bin")):
        train, val = text_data.load_token_file(config.data)
        vocab_size = int(max(train.max(), val.max())) + 1
        return TokenData(
            torch.from_numpy(train.astype("int64")),
            torch.from_numpy(val.astype("int64")),
            vocab_size,
            f"{config.data} (token ids)",
        )
    corpus = load_corpus(config.data)
    tokenizer = get_tokenizer(config.tokenizer, corpus, config.model.vocab_size, cache_dir)
    train, val = text_data.tokenize_corpus(corpus, tokenizer, cache_dir)
    return TokenData(train, val, tokenizer.vocab_size, f"{corpus.name} ({config.tokenizer})")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices (embedding, projections, experts, router) and
    none on the norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one pass over each tensor instead of the per-tensor update's several (8 ms -> 3 ms
    # of the tiny preset's 180 ms step on 2 CPU cores). Its rounding differs from the per-tensor
    # update's, so runs do not repeat those made without it bit for bit.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def layer_counts(model: torch.nn.Module) -> list[Tensor]:
    """Each MoE layer's counts of the last forward."""
    return [layer.tokens_per_expert for layer in moe_layers(model)]


def layer_losses(model: torch.nn.Module) -> tuple[float, float]:
    """The balance aux losses and the router z-losses of the last forward, each summed over
    the MoE layers (0 where none)."""
    layers = list(moe_layers(model))
    aux = sum(float(layer.aux_loss.detach()) for layer in layers if layer.aux_loss is not None)
    z = sum(float(layer.z_loss.detach()) for layer in layers if layer.z_loss is not None)
    return aux, z


def step_telemetry(model: torch.nn.Module, step_counts: list[Tensor]) -> dict[str, float]:
    """``balance.balance_telemetry`` of the step, its keys under "balance/", each layer named
    by its module."""
    layers = [
        (name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)
    ]
    telemetry = balance.balance_telemetry(
        {name: counts for (name, _), counts in zip(layers, step_counts, strict=True)},
        {name: layer.balancer.bias for name, layer in layers},
        {
            name: layer.balancer.step_dropped_per_expert
            for name, layer in layers
            if layer.drop_policy is not None
        },
    )
    return {f"balance/{key}": value for key, value in telemetry.items()}


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches,
    config: TrainConfig,
    device: torch.device,
    layout: ParallelLayout,
) -> dict[str, object]:
    """Loss on the held-out batches and MaxVio_global: each layer's counts summed over the
    whole evaluation set, and over every rank (eval forwards do not count toward the
    balancer). Each rank evaluates its share of every batch."""
    model.eval()
    meter = balance.LoadMeter()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    for inputs, targets in batches:
        inputs, targets = (local_share(t, layout).to(device) for t in (inputs, targets))
        with autocast(config, device):
            logits = model(inputs)
        totals[0] += language_model_loss(logits, targets).double() * targets.numel()
        totals[1] += targets.numel()
        meter.add(layer_counts(model))
    model.train()
    counts = [c.to(device) for c in meter.tokens_per_expert]
    if layout.distributed:
        dist.all_reduce(totals)
        for c in counts:
            dist.all_reduce(c)
    per_layer = [float(balance.max_violation(c)) for c in counts]
    return {
        "val_loss": float(totals[0] / totals[1]),
        "maxvio_global": mean(per_layer),
        "maxvio_global_per_layer": per_layer,
    }


def local_share(batch: Tensor, layout: ParallelLayout) -> Tensor:
    """This rank's rows of a global batch (the whole batch in one process)."""
    share = batch.shape[0] // layout.world_size
    return batch[layout.rank * share : (layout.rank + 1) * share]


def computation_batch_maxvio(
    micro_counts: list[list[Tensor]], layout: ParallelLayout, device: torch.device
) -> float:
    """Mean MaxVio per computation batch (micro_batch x ep_data_parallel sequences: the tokens
    one expert-parallel group routes in one forward) over the step's micro-batches, the layers
    and the expert-parallel groups; ``micro_counts`` holds each micro-batch's [E] counts per
    layer."""
    counts = torch.stack([torch.stack(layers) for layers in micro_counts])
    if layout.ep_size > 1:
        dist.all_reduce(counts, group=layout.ep_group)
    return mean_over_ranks(float(balance.max_violation(counts).mean()), device)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    sampler: text_data.BatchSampler,
    config: TrainConfig,
    device: torch.device,
    layout: ParallelLayout,
) -> dict[str, float]:
    """One optimizer step over ``grad_accumulation`` micro-batches on every rank (gradients of
    the mean loss over all of them); then the balancer update (the bias moves with the counts
    of the whole step, summed over the ranks)."""
    losses, aux_losses, z_losses, micro_counts = [], [], [], []
    for _ in range(config.grad_accumulation):
        inputs, targets = (local_share(t, layout).to(device) for t in sampler.next_batch())
        with nvtx_range("forward"), autocast(config, device):
            loss = language_model_loss(model(inputs), targets)
            aux = total_aux_loss(model)
            total = loss if aux is None else loss + aux
        with nvtx_range("backward"):
            (total / config.grad_accumulation).backward()
        losses.append(float(loss.detach()))
        aux_loss, z_loss = layer_losses(model)
        aux_losses.append(aux_loss)
        z_losses.append(z_loss)
        micro_counts.append(layer_counts(model))
    with nvtx_range("optimizer"):
        if isinstance(model, FSDPModule):
            fsdp.finish_gradients(model, layout)
            grad_norm = fsdp.clip_grad_norm_(model, config.grad_clip)
        else:
            average_gradients(model, layout)
            grad_norm = clip_grad_norm_(model, config.grad_clip, layout)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    step_counts = update_balance(model)
    step_maxvio = [float(balance.max_violation(c)) for c in step_counts]
    return {
        "train_loss": mean_over_ranks(mean(losses), device),
        "aux_loss": mean_over_ranks(mean(aux_losses), device),
        "z_loss": mean_over_ranks(mean(z_losses), device),
        "grad_norm": float(grad_norm),
        "lr": schedule.get_last_lr()[0],
        "maxvio_batch": mean(step_maxvio),
        "maxvio_batch_per_layer": step_maxvio,
        "maxvio_computation_batch": computation_batch_maxvio(micro_counts, layout, device),
        **step_telemetry(model, step_counts),
    }


def write_history(history: list[dict[str, object]], out_dir: Path) -> None:
    atomic_write_text(out_dir / "history.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def summarize(
    config: TrainConfig,
    history: list[dict[str, object]],
    data: TokenData,
    model,
    device,
    layout: ParallelLayout,
) -> dict[str, object]:
    last = history[-1]
    tail = history[-max(1, len(history) // 10) :]
    timed = [row for row in history if "tokens_per_s" in row]
    return {
        "balancing": config.balancing,
        "data": data.description,
        "device": str(device),
        "ranks": layout.world_size,
        "ep_size": layout.ep_size,
        "steps": last["step"],
        "tokens": last["step"] * config.tokens_per_step * layout.world_size,
        "parameters": parameter_count(model, layout),
        "train_loss": mean([row["train_loss"] for row in tail]),
        "val_loss": last["val_loss"],
        "val_perplexity": math.exp(last["val_loss"]),
        "maxvio_global": last["maxvio_global"],
        "maxvio_global_per_layer": last["maxvio_global_per_layer"],
        "maxvio_batch": mean([row["maxvio_batch"] for row in history]),
        "maxvio_batch_final": mean([row["maxvio_batch"] for row in tail]),
        "maxvio_computation_batch": mean([row["maxvio_computation_batch"] for row in history]),
        "tokens_per_s": mean([row["tokens_per_s"] for row in timed]),
        "config": config.to_dict(),
    }


def parameter_count(model: torch.nn.Module, layout: ParallelLayout) -> int:
    """Parameters of the whole model, each sharded expert weight at its full size."""
    return sum(
        p.numel() * (layout.ep_size if is_sharded_expert(p, model) else 1)
        for p in model.parameters()
    )


def resumable(config: dict[str, object], ranks: int) -> dict[str, object]:
    """What a resumed run must share with the run that wrote its checkpoint: every setting,
    except how the ranks split the work (the expert-parallel size and transport, the
    micro-batch of a rank), as long as the global batches are the same. Only sharded
    checkpoints (``--fsdp``) resume on another layout; a per-rank one is found by its ranks'
    number."""
    kept = {k: v for k, v in config.items() if k not in ("ep_size", "ep_transport")}
    kept["micro_batch_size"] = config["micro_batch_size"] * ranks  # of the global batch
    return json.loads(json.dumps(kept))


def train(
    config: TrainConfig,
    out_dir: Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    label: str | None = None,
    cache_dir: Path | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
    tensorboard: Path | None = None,
) -> dict[str, object]:
    """Trains one model, writing its checkpoint, ``history.jsonl``, ``summary.json``, the plots
    and ``model.pt`` (the consolidated weights) into ``out_dir``; with ``resume``, continues
    from its checkpoint exactly (same weights, optimizer, bias, counts, RNG and data position).
    ``label`` names the run on its progress bar (default: its balancing). Returns the summary.

    Under ``torchrun`` (an initialised default group) every rank calls it alike: each trains on
    its share of every global batch, experts are sharded over groups of ``config.ep_size``
    ranks, and each rank writes its own checkpoint file (``checkpoint-rank<r>-of-<W>.pt``: its
    experts, optimizer state and RNG); rank 0 writes the rest. On GPUs the dispatcher's
    transport "auto" is the direct NCCL one: safe here, since this loop runs no other collective
    while rows move (gradients are reduced after backward). A collective that waits longer than
    ``timeout`` for another rank stops this one with an error. ``tensorboard``: a folder where
    rank 0 also writes each history row as TensorBoard scalars. With ``config.fsdp`` the model
    is sharded by FSDP2 (``moe_kernels.fsdp``) over the default group, which must exist (one
    rank of its own for one process: ``moe-train --fsdp`` makes it), and the checkpoint is a
    folder of DCP shards that resumes on another number of ranks or expert-parallel size."""
    layout = init_expert_parallel(config.ep_size, timeout)
    is_main = layout.rank == 0
    # The data first: a source that cannot be read, or too short for a window, stops the run
    # before it writes anything.
    data = prepare_data(config, cache_dir or default_cache_dir())
    # One sampler of global batches, the same on every rank: each takes its share, so W ranks
    # train on exactly the batches of one process with a W times larger micro-batch.
    sampler = text_data.BatchSampler(
        data.train, config.micro_batch_size * layout.world_size, config.seq_len, config.seed
    )
    eval_set = text_data.eval_batches(
        data.val,
        config.micro_batch_size * layout.world_size,
        config.seq_len,
        config.eval_tokens,
        multiple_of=layout.world_size,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    if (
        torch_device.type == "cuda"
        and layout.ep_size > 1
        and config.ep_transport != "process_group"
    ):
        init_nccl(layout.ep_group, torch_device, timeout)
        layout = dataclasses.replace(layout, ep_transport="nccl")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, vocab_size=data.vocab_size)
    )
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = MoETransformer(config, layout).to(torch_device)
    if config.fsdp:
        param_dtype = torch.bfloat16 if config.dtype == "bf16" else None
        fsdp.shard_model(
            model, fsdp.fsdp_mesh(layout, torch_device.type), model.blocks, param_dtype
        )
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    history: list[dict[str, object]] = []
    checkpoint_path = out_dir / (
        SHARDED_CHECKPOINT_NAME if config.fsdp else checkpoint_name(layout)
    )
    if resume and checkpoint_path.exists():
        if config.fsdp:
            state = load_sharded_checkpoint(
                checkpoint_path, model, optimizer, {"sampler": sampler.state_dict()}
            )
        else:
            state = load_checkpoint(checkpoint_path)
        # Settings added since the checkpoint was written take their defaults.
        written = TrainConfig.from_dict(state["config"]).to_dict()
        if config.fsdp:
            written = resumable(written, state["ranks"])
        wanted = resumable(config.to_dict(), layout.world_size) if config.fsdp else config.to_dict()
        if written != wanted:
            raise BadArgument(
                f"--resume: the checkpoint in {out_dir} was written by another configuration; "
                "use the same options or another --out"
            )
        if not config.fsdp:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        history = state["history"]
    elif resume and any(out_dir.glob("checkpoint*.pt")):
        raise BadArgument(
            f"--resume: {out_dir} holds no {checkpoint_path.name}: its checkpoints were "
            f"written by another number of ranks than {layout.world_size}"
        )
    elif resume and is_main:
        # A job that always passes --resume starts this way: said, not refused.
        print(f"--resume: no checkpoint in {out_dir}: training from step 0", file=sys.stderr)
    step = history[-1]["step"] if history else 0

    def checkpoint() -> None:
        run_state = dict(
            schedule=schedule.state_dict(),
            sampler=sampler.state_dict(),
            config=config.to_dict(),
            history=history,
        )
        if config.fsdp:
            save_sharded_checkpoint(
                checkpoint_path, model, optimizer, ranks=layout.world_size, **run_state
            )
            export = fsdp.full_state_dict(model)
        else:
            save_checkpoint(
                checkpoint_path,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                **run_state,
            )
            export = consolidated_state_dict(model, layout)
        if is_main:
            save_export(out_dir / EXPORT_NAME, export, config)
            write_history(history, out_dir)
        if layout.distributed:
            dist.barrier()  # every rank's file is written before any moves on

    bar = tqdm(
        total=config.steps,
        initial=step,
        desc=label or config.balancing,
        disable=not (progress and is_main),
        dynamic_ncols=True,
    )
    model.train()
    tokens_per_step = config.tokens_per_step * layout.world_size
    scalars = ScalarLog(tensorboard) if tensorboard is not None and is_main else None
    with scalars or nullcontext():
        while step < config.steps:
            begin = time.perf_counter()
            row: dict[str, object] = {"step": step + 1}
            row.update(
                train_step(model, optimizer, schedule, sampler, config, torch_device, layout)
            )
            row["tokens_per_s"] = tokens_per_step / (time.perf_counter() - begin)
            step += 1
            if step % config.eval_every == 0 or step == config.steps:
                row.update(evaluate(model, eval_set, config, torch_device, layout))
            history.append(row)
            if scalars is not None:
                scalars.write(row)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                tok_s=f"{row['tokens_per_s']:.0f}",
                maxvio=f"{row['maxvio_batch']:.2f}",
            )
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
    bar.close()
    summary = summarize(config, history, data, model, torch_device, layout)
    if is_main:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_runs({config.balancing: history}, out_dir)
    return summary
