"""Runs the study: every arm trained once (cached and resumable), then measured on held-out text,
then the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..train.atomic import atomic_write_text
from ..train.checkpoint import load_export
from ..train.config import PRESETS as TRAIN_PRESETS
from ..train.config import ModelConfig, TrainConfig
from ..train.documents import default_cache_dir
from ..train.loop import prepare_data, train
from ..train.model import MoETransformer
from .measures import counts_per_sequence, future_token_leakage, maxvio_by_computation_batch
from .strategies import strategies

# Computation batches of 1 to 64 held-out sequences (arXiv 2408.15664, Figure 5).
COMPUTATION_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
LEAKAGE_SEQUENCES = 4

STUDY_PRESETS: dict[str, TrainConfig] = {
    # The tiny training preset for every arm: about a minute each on 2 CPU cores.
    "default": TRAIN_PRESETS["tiny"],
    # Seconds per arm: the report's structure, not its findings.
    "quick": TrainConfig(
        model=ModelConfig(
            hidden_size=64, num_layers=2, num_heads=2, num_experts=8, expert_ffn_hidden_size=64,
            max_seq_len=64,
        ),
        seq_len=64, micro_batch_size=8, steps=40, warmup_steps=5, rate=1e-2,
        eval_every=20, eval_tokens=8192, checkpoint_every=20,
    ),
}  # fmt: skip


def run_arm(config: TrainConfig, out_dir: Path, device: str, progress: bool) -> dict:
    """Trains one arm unless its summary exists (a finished run is never repeated; an
    interrupted one resumes from its checkpoint) and returns its summary."""
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    resume = any(out_dir.glob("checkpoint*.pt"))
    return train(config, out_dir, device=device, resume=resume, progress=progress)


@torch.no_grad()
def measure_arm(out_dir: Path, held_out: torch.Tensor) -> dict:
    """The arm's measurements on held-out sequences (cached in ``measures.json``): MaxVio by
    computation batch size, and how far its outputs move when later tokens change."""
    measures_path = out_dir / "measures.json"
    if measures_path.exists():
        return json.loads(measures_path.read_text())
    config, state = load_export(out_dir / "model.pt")
    model = MoETransformer(config)
    model.load_state_dict(state)
    counts = counts_per_sequence(model, held_out)
    measures = {
        "maxvio_by_computation_batch": {
            str(size): value
            for size, value in maxvio_by_computation_batch(counts, COMPUTATION_BATCH_SIZES).items()
        },
        "future_token_leakage": future_token_leakage(
            model, held_out[:LEAKAGE_SEQUENCES], position=held_out.shape[1] // 2
        ),
    }
    atomic_write_text(measures_path, json.dumps(measures, indent=2) + "\n")
    return measures


def held_out_sequences(config: TrainConfig, count: int) -> torch.Tensor:
    """The first ``count`` held-out sequences of the arms' data, [count, seq_len]."""
    val = prepare_data(config, default_cache_dir()).val
    length = config.seq_len
    if val.numel() < count * length:
        raise ValueError(f"the held-out text has fewer than {count} sequences of {length}")
    return val[: count * length].view(count, length)


def run_study(preset: str, out_dir: Path, device: str = "cpu", progress: bool = True) -> dict:
    """Trains and measures every arm of ``strategies(STUDY_PRESETS[preset])`` under
    ``out_dir/runs/<arm>``; returns {arm: summary and measures}."""
    base = STUDY_PRESETS[preset]
    held_out = held_out_sequences(base, max(COMPUTATION_BATCH_SIZES))
    results = {}
    for name, config in strategies(base).items():
        arm_dir = out_dir / "runs" / name
        summary = run_arm(config, arm_dir, device, progress)
        results[name] = {"summary": summary, "measures": measure_arm(arm_dir, held_out)}
    atomic_write_text(
        out_dir / "results.json",
        json.dumps({"preset": preset, "arms": results}, indent=2, default=str) + "\n",
    )
    return results
