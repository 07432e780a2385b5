"""Runs the study: every arm trained once (cached and resumable), then measured on held-out text
(overall and per domain), then checked on real expert parallelism."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ..train.atomic import atomic_write_text
from ..train.checkpoint import load_export
from ..train.config import PRESETS as TRAIN_PRESETS
from ..train.config import ModelConfig, TrainConfig
from ..train.corpus import load_corpus
from ..train.documents import default_cache_dir
from ..train.loop import prepare_data, train
from ..train.model import MoETransformer
from ..train.tokenizer import get_tokenizer
from .expert_parallel import run_expert_parallel
from .measures import (
    counts_per_sequence,
    domain_specialisation,
    expert_frequency,
    future_token_leakage,
    maxvio_by_computation_batch,
    topk_score_sum,
)
from .strategies import strategies

# Computation batches of 1 to 64 held-out sequences (arXiv 2408.15664, Figure 5).
COMPUTATION_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
LEAKAGE_SEQUENCES = 4
# Held-out sequences per domain: domains with fewer are left out, more are cut off.
DOMAIN_SEQUENCES = (8, 16)
# Expert-parallel groups the computation batches are checked on.
EXPERT_PARALLEL_RANKS = (2, 4)

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
    return train(
        config, out_dir, device=device, resume=resume, progress=progress, label=out_dir.name
    )


@torch.no_grad()
def measure_arm(out_dir: Path, held_out: torch.Tensor, domains: dict[str, torch.Tensor]) -> dict:
    """The arm's measurements on held-out sequences (cached in ``measures.json``): MaxVio by
    computation batch size, how far its outputs move when later tokens change, the top-k score
    sum per layer, and each domain's expert frequencies with their specialisation (None with
    fewer than 2 domains)."""
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
        "topk_score_sum": topk_score_sum(model, held_out),
    }
    frequencies = {
        domain: expert_frequency(counts_per_sequence(model, sequences))
        for domain, sequences in domains.items()
    }
    measures["expert_frequency_by_domain"] = {d: f.tolist() for d, f in frequencies.items()}
    measures["domain_specialisation"] = (
        domain_specialisation(torch.stack(list(frequencies.values())))
        if len(frequencies) >= 2
        else None
    )
    atomic_write_text(measures_path, json.dumps(measures, indent=2) + "\n")
    return measures


def held_out_sequences(config: TrainConfig, count: int) -> torch.Tensor:
    """The first ``count`` held-out sequences of the arms' data, [count, seq_len]."""
    val = prepare_data(config, default_cache_dir()).val
    length = config.seq_len
    if val.numel() < count * length:
        raise ValueError(f"the held-out text has fewer than {count} sequences of {length}")
    return val[: count * length].view(count, length)


def held_out_by_domain(config: TrainConfig) -> dict[str, torch.Tensor]:
    """{domain: [n, seq_len] ids}: each domain's held-out documents (``Corpus.val_domains``)
    encoded one after another, for domains with at least ``DOMAIN_SEQUENCES[0]`` sequences,
    at most ``DOMAIN_SEQUENCES[1]`` each, in order of name; {} for a token file."""
    if config.data.endswith((".npy", ".bin")):
        return {}
    corpus = load_corpus(config.data)
    tokenizer = get_tokenizer(
        config.tokenizer, corpus, config.model.vocab_size, default_cache_dir()
    )
    ids: dict[str, list[int]] = defaultdict(list)
    for text, domain in zip(corpus.val, corpus.val_domains, strict=True):
        ids[domain] += [*tokenizer.encode(text), tokenizer.eot_id]
    fewest, most = DOMAIN_SEQUENCES
    domains = {}
    for domain in sorted(ids):
        count = min(len(ids[domain]) // config.seq_len, most)
        if count >= fewest:
            domains[domain] = torch.tensor(ids[domain][: count * config.seq_len]).view(count, -1)
    return domains


def run_study(preset: str, out_dir: Path, device: str = "cpu", progress: bool = True) -> dict:
    """Trains and measures every arm of ``strategies(STUDY_PRESETS[preset])`` under
    ``out_dir/runs/<arm>``, then runs the token-choice arms on ``EXPERT_PARALLEL_RANKS``
    ranks; writes and returns {"preset", "domains": [name], "arms": {arm: {"summary",
    "measures"}}, "expert_parallel": {ranks: {arm: {size: MaxVio}}}}."""
    base = STUDY_PRESETS[preset]
    held_out = held_out_sequences(base, max(COMPUTATION_BATCH_SIZES))
    domains = held_out_by_domain(base)
    arms = {}
    configs = strategies(base)
    for index, (name, config) in enumerate(configs.items(), 1):
        if progress:
            print(f"[{index}/{len(configs)}] {name}", flush=True)
        arm_dir = out_dir / "runs" / name
        summary = run_arm(config, arm_dir, device, progress)
        arms[name] = {"summary": summary, "measures": measure_arm(arm_dir, held_out, domains)}
    token_choice = [
        out_dir / "runs" / name
        for name, config in configs.items()
        if config.balancing != "expert_choice"
    ]
    study = {
        "preset": preset,
        "domains": list(domains),
        "arms": arms,
        "expert_parallel": {
            str(ranks): run_expert_parallel(token_choice, held_out, ranks, out_dir / "runs")
            for ranks in EXPERT_PARALLEL_RANKS
        },
    }
    atomic_write_text(out_dir / "results.json", json.dumps(study, indent=2, default=str) + "\n")
    return study
