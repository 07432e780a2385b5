"""``moe-train`` / ``python -m moe_kernels.train``: train a small MoE language model on real
text with one or more balancing strategies, and compare their loss and load balance."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .._arguments import check_number
from ..layer import BALANCING, DROP_POLICIES
from ..memory import keep_freed_memory
from ..router import SCORE_FNS
from .config import CHOICES as RUN_CHOICES
from .config import PRESETS, TrainConfig
from .errors import BadArgument, UsageError
from .loop import resolve_device, train
from .model import MoETransformer
from .plots import plot_runs
from .tensorboard import summary_writer_class

# Options that override a preset's run settings, and those of its model.
RUN_OPTIONS = {
    "data": str,
    "tokenizer": str,
    "seq_len": int,
    "micro_batch_size": int,
    "grad_accumulation": int,
    "steps": int,
    "lr": float,
    "warmup_steps": int,
    "seed": int,
    "dtype": str,
    "rate": float,
    "bias_warmup_rate": float,
    "bias_warmup_steps": int,
    "rule": str,
    "aux_coeff": float,
    "z_loss_coeff": float,
    "aux_group_size": int,
    "global_counts": str,
    "capacity_factor": float,
    "drop_policy": str,
    "ep_size": int,
    "ep_transport": str,
    "eval_every": int,
    "eval_tokens": int,
    "checkpoint_every": int,
}
MODEL_OPTIONS = {
    "vocab_size": int,
    "hidden_size": int,
    "num_layers": int,
    "num_heads": int,
    "num_experts": int,
    "topk": int,
    "expert_ffn_hidden_size": int,
    "num_shared_experts": int,
    "score_fn": str,
    "n_groups": int,
    "topk_groups": int,
}
CHOICES = {**RUN_CHOICES, "score_fn": SCORE_FNS, "drop_policy": DROP_POLICIES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-train",
        description=__doc__,
        epilog="Data: 'stdlib' (the docstrings and comments of Python's standard library, "
        "the default), 'kjv' (Debian's bible-kjv-text), a text file or folder, or a "
        "pre-tokenized .npy / .bin (uint16) file of token ids. Expert parallelism: "
        "torchrun --nproc_per_node=P -m moe_kernels.train --ep-size P (every rank draws its "
        "own micro-batch; experts sharded over groups of --ep-size ranks; Gloo on the CPU, "
        "NCCL on GPUs).",
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--balancing",
        nargs="+",
        default=["loss_free"],
        metavar="STRATEGY",
        help="one or more strategies, each trained from the same start (default loss_free): "
        f"{', '.join(BALANCING)}, or the loss-free bias with an aux loss, e.g. "
        "loss_free+seq_aux_loss",
    )
    parser.add_argument("--out", type=Path, default=None, help="default runs/<preset>")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each step's numbers (losses, MaxVio, balance telemetry) as TensorBoard "
        "scalars into DIR/<strategy>",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others in a collective before it "
        "stops with an error (default 600)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, have malloc keep freed memory for reuse instead of mapping fresh "
        "pages for every large buffer (moe_kernels.keep_freed_memory; default on)",
    )
    for name, kind in {**RUN_OPTIONS, **MODEL_OPTIONS}.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=CHOICES.get(name))
    parser.add_argument(
        "--center-bias",
        action="store_const",
        const=True,
        help="loss-free: subtract each bias update's mean, so the biases stay centred",
    )
    parser.add_argument(
        "--fsdp",
        action="store_const",
        const=True,
        help="shard the model with FSDP2 over the ranks (experts over --ep-size groups, then "
        "over their replicas); checkpoints are sharded and resume on another number of ranks",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_const",
        const=True,
        help="recompute each block's activations in the backward (less memory; the balancer's "
        "counts stay exact)",
    )
    parser.add_argument(
        "--pad-to-capacity",
        action="store_const",
        const=True,
        help="with --drop-policy: pad every expert's rows to its capacity (static shapes)",
    )
    return parser


def config_from_args(args: argparse.Namespace, balancing: str) -> TrainConfig:
    preset = PRESETS[args.preset]
    run = {
        name: getattr(args, name)
        for name in (
            *RUN_OPTIONS,
            "center_bias",
            "pad_to_capacity",
            "fsdp",
            "activation_checkpointing",
        )  # fmt: skip
        if getattr(args, name) is not None
    }
    model = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    if "seq_len" in run:
        model.setdefault("max_seq_len", max(run["seq_len"], preset.model.max_seq_len))
    return dataclasses.replace(
        preset,
        balancing=balancing,
        model=dataclasses.replace(preset.model, **model),
        **run,
    )


def checked_config(args: argparse.Namespace, balancing: str) -> TrainConfig:
    """The run's configuration with every setting checked before anything runs or is written:
    the run's own, then the model's by building it on the meta device (the layers' own checks,
    no memory)."""
    config = config_from_args(args, balancing)
    try:
        config.check()
        with torch.device("meta"):
            MoETransformer(config)
    except ValueError as error:
        raise BadArgument(str(error)) from None
    return config


def check_options(args: argparse.Namespace) -> None:
    """The options that are not settings of a run, checked once: the timeout, and the package
    --tensorboard needs, there before any run starts."""
    try:
        check_number("timeout", args.timeout, strict=True)
    except ValueError as error:
        raise BadArgument(str(error)) from None
    if args.tensorboard is not None:
        summary_writer_class()


def report(error: UsageError) -> int:
    """One line for an argument or data source that cannot be used, and exit status 2 (as
    argparse gives a malformed command line)."""
    print(f"moe-train: error: {error}", file=sys.stderr, flush=True)
    return 2


def init_distributed(device: str, timeout: float, fsdp: bool) -> torch.device | None:
    """Joins the torchrun job this process belongs to: NCCL between GPUs, one per local rank,
    Gloo between CPU processes. Returns the device; None when not launched by torchrun,
    except with ``fsdp``: FSDP2 shards over a process group, so one process gets a group of
    its own (one rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if not fsdp:
            return None
        torch_device = resolve_device(device)
        backend = "cpu:gloo,cuda:nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return torch_device
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    dist.init_process_group(
        "nccl" if torch_device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout),
        device_id=torch_device if torch_device.type == "cuda" else None,
    )
    return torch_device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        configs = {balancing: checked_config(args, balancing) for balancing in args.balancing}
    except UsageError as error:
        return report(error)
    out = args.out or Path("runs") / args.preset
    device = init_distributed(args.device, args.timeout, bool(args.fsdp))
    rank = dist.get_rank() if device is not None else 0
    try:
        return run(args, configs, out, args.device if device is None else str(device), rank)
    except UsageError as error:  # a data source (every rank finds the same)
        return report(error)
    except BaseException as error:
        if device is not None:
            # The other ranks stop too: their collectives fail when this process's connections
            # close, or at the latest after --timeout seconds.
            print(f"moe-train: rank {rank} failed: {error!r}", file=sys.stderr, flush=True)
        raise
    finally:
        if device is not None and dist.is_initialized():
            dist.destroy_process_group()


def run(
    args: argparse.Namespace, configs: dict[str, TrainConfig], out: Path, device: str, rank: int
) -> int:
    if args.keep_freed_memory and resolve_device(device).type == "cpu":
        keep_freed_memory()
    summaries, histories = {}, {}
    for balancing, config in configs.items():
        run_dir = out / balancing
        summary = train(
            config,
            run_dir,
            device=device,
            resume=args.resume,
            progress=not args.no_progress,
            cache_dir=args.cache_dir,
            timeout=datetime.timedelta(seconds=args.timeout),
            tensorboard=None if args.tensorboard is None else args.tensorboard / balancing,
        )
        if rank != 0:
            continue
        summaries[balancing] = summary
        histories[balancing] = [
            json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()
        ]
        print(
            f"{balancing}: val loss {summary['val_loss']:.4f} "
            f"(perplexity {summary['val_perplexity']:.1f}), "
            f"MaxVio_global {summary['maxvio_global']:.3f}, "
            f"MaxVio_batch {summary['maxvio_batch']:.3f}, "
            f"{summary['tokens_per_s']:.0f} tokens/s -> {run_dir / 'summary.json'}",
            flush=True,
        )
    if len(histories) > 1:
        for path in plot_runs(histories, out):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
