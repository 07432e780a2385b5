"""The training loop: gradient accumulation, the balancer update after each optimizer step,
evaluation on held-out text, MaxVio, checkpoints, a summary and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .. import balance
from .._nvtx import nvtx_range
from ..layer import moe_layers, total_aux_loss, update_balance
from . import data as text_data
from .atomic import atomic_write_text
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .corpus import load_corpus
from .documents import default_cache_dir
from .model import MoETransformer, language_model_loss
from .plots import plot_runs
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
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


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


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches, config: TrainConfig, device: torch.device
) -> dict[str, object]:
    """Loss on the held-out batches and MaxVio_global: each layer's counts summed over the
    whole evaluation set (eval forwards do not count toward the balancer)."""
    model.eval()
    meter = balance.LoadMeter()
    loss_sum, tokens = 0.0, 0
    for inputs, targets in batches:
        with autocast(config, device):
            logits = model(inputs.to(device))
        loss_sum += float(language_model_loss(logits, targets.to(device))) * targets.numel()
        tokens += targets.numel()
        meter.add(layer_counts(model))
    model.train()
    per_layer = meter.max_violation()
    return {
        "val_loss": loss_sum / tokens,
        "maxvio_global": mean(per_layer),
        "maxvio_global_per_layer": per_layer,
    }


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    sampler: text_data.BatchSampler,
    config: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step over ``grad_accumulation`` micro-batches; then the balancer update
    (the bias moves with the counts of the whole step)."""
    losses, aux_losses, maxvio_micro = [], [], []
    for _ in range(config.grad_accumulation):
        inputs, targets = (t.to(device) for t in sampler.next_batch())
        with nvtx_range("forward"), autocast(config, device):
            loss = language_model_loss(model(inputs), targets)
            aux = total_aux_loss(model)
            total = loss if aux is None else loss + aux
        with nvtx_range("backward"):
            (total / config.grad_accumulation).backward()
        losses.append(float(loss.detach()))
        aux_losses.append(0.0 if aux is None else float(aux.detach()))
        # The computation batch of one process is the micro-batch.
        maxvio_micro.append(mean([float(balance.max_violation(c)) for c in layer_counts(model)]))
    with nvtx_range("optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    step_maxvio = [float(balance.max_violation(c)) for c in update_balance(model)]
    return {
        "train_loss": mean(losses),
        "aux_loss": mean(aux_losses),
        "grad_norm": float(grad_norm),
        "lr": schedule.get_last_lr()[0],
        "maxvio_batch": mean(step_maxvio),
        "maxvio_batch_per_layer": step_maxvio,
        "maxvio_computation_batch": mean(maxvio_micro),
    }


def write_history(history: list[dict[str, object]], out_dir: Path) -> None:
    atomic_write_text(out_dir / "history.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def summarize(
    config: TrainConfig, history: list[dict[str, object]], data: TokenData, model, device
) -> dict[str, object]:
    last = history[-1]
    tail = history[-max(1, len(history) // 10) :]
    timed = [row for row in history if "tokens_per_s" in row]
    return {
        "balancing": config.balancing,
        "data": data.description,
        "device": str(device),
        "steps": last["step"],
        "tokens": last["step"] * config.tokens_per_step,
        "parameters": sum(p.numel() for p in model.parameters()),
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


def train(
    config: TrainConfig,
    out_dir: Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> dict[str, object]:
    """Trains one model, writing ``checkpoint.pt``, ``history.jsonl``, ``summary.json`` and
    the plots into ``out_dir``; with ``resume``, continues from its checkpoint exactly (same
    weights, optimizer, bias, counts, RNG and data position). Returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    data = prepare_data(config, cache_dir or default_cache_dir())
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, vocab_size=data.vocab_size)
    )
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = MoETransformer(config).to(torch_device)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    sampler = text_data.BatchSampler(
        data.train, config.micro_batch_size, config.seq_len, config.seed
    )
    eval_set = text_data.eval_batches(
        data.val, config.micro_batch_size, config.seq_len, config.eval_tokens
    )
    history: list[dict[str, object]] = []
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state["config"] != config.to_dict():
            raise ValueError(
                f"--resume: the checkpoint in {out_dir} was written by another configuration; "
                "use the same options or another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        history = state["history"]
    step = history[-1]["step"] if history else 0

    def checkpoint() -> None:
        save_checkpoint(
            checkpoint_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            sampler=sampler.state_dict(),
            config=config.to_dict(),
            history=history,
        )
        write_history(history, out_dir)

    bar = tqdm(
        total=config.steps,
        initial=step,
        desc=config.balancing,
        disable=not progress,
        dynamic_ncols=True,
    )
    model.train()
    while step < config.steps:
        begin = time.perf_counter()
        row: dict[str, object] = {"step": step + 1}
        row.update(train_step(model, optimizer, schedule, sampler, config, torch_device))
        row["tokens_per_s"] = config.tokens_per_step / (time.perf_counter() - begin)
        step += 1
        if step % config.eval_every == 0 or step == config.steps:
            row.update(evaluate(model, eval_set, config, torch_device))
        history.append(row)
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['train_loss']:.3f}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            maxvio=f"{row['maxvio_batch']:.2f}",
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
    bar.close()
    summary = summarize(config, history, data, model, torch_device)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_runs({config.balancing: history}, out_dir)
    return summary
