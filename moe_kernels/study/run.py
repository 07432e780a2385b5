"""Runs the study: every arm trained from each of its seeds (cached and resumable), each model
measured on training-distribution windows and held-out text, the expert-parallel check, then
the findings."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..balance import max_violation
from ..parallel import ParallelLayout
from ..train.atomic import atomic_write_text
from ..train.checkpoint import load_export
from ..train.config import PRESETS as TRAIN_PRESETS
from ..train.config import ModelConfig, TrainConfig
from ..train.data import eval_batches
from ..train.loop import evaluate, resolve_device, train
from ..train.model import MoETransformer
from .expert_parallel import MICRO_BATCHES, run_expert_parallel
from .findings import findings
from .measures import (
    consecutive_batch_maxvio,
    future_token_leakage,
    topk_score_sum,
    window_counts,
)
from .stats import (
    balanced_router_counts,
    computation_batch_curve,
    domain_frequencies,
    specialisation_against_null,
)
from .strategies import TABLE_PAIR, Arm, Seeds, strategies
from .windows import StudyWindows, study_windows

LEAKAGE_SEQUENCES = 4


@dataclass(frozen=True)
class StudyPreset:
    """What one study trains and measures.

    ``train``: every arm's base; ``seeds``: paired seeds per question; ``bias_warmup_steps``:
    the loss-free warm-up; ``perplexity_tokens``: held-out tokens of the final perplexity;
    ``balance_windows``: random training windows every model routes (Figure 5's computation
    batches are drawn from them, ``curve_groups`` per size, up to ``largest_batch``, the
    criterion read over ``large_batches``); ``domains`` x ``windows_per_domain``: the
    windows of domain specialisation, against ``null_permutations`` shuffles of their labels;
    ``expert_parallel_ranks`` and ``expert_parallel_windows``: the expert-parallel check.
    """

    train: TrainConfig
    seeds: Seeds
    bias_warmup_steps: int
    perplexity_tokens: int
    balance_windows: int
    largest_batch: int
    large_batches: tuple[int, int]
    curve_groups: int
    domains: int
    windows_per_domain: int
    null_permutations: int
    expert_parallel_ranks: tuple[int, ...]
    expert_parallel_windows: int

    @property
    def curve_sizes(self) -> list[int]:
        """1, 2, 4, ... up to ``largest_batch``, then every window (the plateau)."""
        sizes = [1 << i for i in range(self.largest_batch.bit_length())]
        return [*sizes, self.balance_windows]


def _study_train(base: TrainConfig, eval_every: int) -> TrainConfig:
    # The runs' own evaluations only trace MaxVio_global and loss over training (8 k held-out
    # tokens each); the study measures the final models on far more text.
    return dataclasses.replace(base, eval_every=eval_every, eval_tokens=8192)


STUDY_PRESETS: dict[str, StudyPreset] = {
    # About 30 minutes on 2 CPU cores with --jobs 2: 36 runs of the tiny training preset (300
    # steps of 2048 tokens), 8 paired seeds for the Table-2 pair, 4 for the balance batch, 3
    # for the frontier.
    "default": StudyPreset(
        train=_study_train(TRAIN_PRESETS["tiny"], eval_every=25),
        seeds=Seeds(table=8, frontier=3, balance_batch=4),
        bias_warmup_steps=150,
        perplexity_tokens=65536,
        balance_windows=2048,
        largest_batch=1024,
        large_batches=(64, 1024),
        curve_groups=200,
        domains=12,
        windows_per_domain=32,
        null_permutations=200,
        expert_parallel_ranks=(2, 4),
        expert_parallel_windows=64,
    ),
    # A few minutes: the report's structure and rules, not its findings.
    "quick": StudyPreset(
        train=TrainConfig(
            model=ModelConfig(
                hidden_size=64,
                num_layers=2,
                num_heads=2,
                num_experts=8,
                expert_ffn_hidden_size=64,
                max_seq_len=64,
            ),
            seq_len=64,
            micro_batch_size=8,
            steps=40,
            warmup_steps=5,
            eval_every=10,
            eval_tokens=4096,
            checkpoint_every=20,
        ),
        seeds=Seeds(table=2, frontier=1, balance_batch=2),
        bias_warmup_steps=20,
        perplexity_tokens=8192,
        balance_windows=256,
        largest_batch=128,
        large_batches=(16, 128),
        curve_groups=50,
        domains=4,
        windows_per_domain=8,
        null_permutations=50,
        expert_parallel_ranks=(2, 4),
        expert_parallel_windows=16,
    ),  # fmt: skip
    # For one H100/H200 (python -m moe_kernels.study --preset gpu --device cuda): the small
    # training preset's model (32 experts top-4, 6 layers of 256) on 32 sequences of 256
    # tokens a step, computation batches to 4096 windows.
    "gpu": StudyPreset(
        train=dataclasses.replace(
            _study_train(TRAIN_PRESETS["small"], eval_every=50),
            micro_batch_size=32,
            steps=400,
            warmup_steps=40,
            checkpoint_every=400,
        ),
        seeds=Seeds(table=3, frontier=2, balance_batch=2),
        bias_warmup_steps=200,
        perplexity_tokens=262144,
        balance_windows=8192,
        largest_batch=4096,
        large_batches=(64, 4096),
        curve_groups=200,
        domains=16,
        windows_per_domain=64,
        null_permutations=200,
        expert_parallel_ranks=(),
        expert_parallel_windows=0,
    ),  # fmt: skip
}


def run_arm(config: TrainConfig, out_dir: Path, device: str, progress: bool, label: str) -> dict:
    """Trains one run unless its summary exists (a finished run is never repeated; an
    interrupted one resumes from its checkpoint) and returns its summary. A finished run of
    another configuration is refused, never reused."""
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if _without_vocab(summary["config"]) != _without_vocab(config.to_dict()):
            raise ValueError(
                f"{out_dir} holds a run of another configuration than this study's {label}: "
                "remove it, or give the study another --out"
            )
        return summary
    resume = any(out_dir.glob("checkpoint*.pt"))
    return train(config, out_dir, device=device, resume=resume, progress=progress, label=label)


def _without_vocab(config: dict) -> dict:
    """A run's configuration as JSON, but for the vocabulary size the data sets."""
    config = json.loads(json.dumps(config))
    del config["model"]["vocab_size"]
    return config


def measure_settings(preset: StudyPreset, windows: StudyWindows) -> dict:
    """What a model's measures depend on beside its weights: cached measures made under other
    settings are measured again."""
    return {
        "perplexity_tokens": preset.perplexity_tokens,
        "balance_windows": preset.balance_windows,
        "curve_sizes": preset.curve_sizes,
        "curve_groups": preset.curve_groups,
        "domains": windows.domains,
        "windows_per_domain": preset.windows_per_domain,
        "null_permutations": preset.null_permutations,
        "expert_parallel_windows": preset.expert_parallel_windows,
    }


@torch.no_grad()
def measure_run(run_dir: Path, preset: StudyPreset, windows: StudyWindows, device: str) -> dict:
    """One trained model's measures (cached in ``measures.json``): perplexity and MaxVio on
    the held-out documents; future-token leakage; and for token choice, from each training
    window's counts (kept in ``counts.pt``), MaxVio_global over all of them (per layer and
    mean), MaxVio of random computation batches by size, consecutive batches for the
    expert-parallel check, and over the domain windows, the top-k score sum per layer, each
    domain's expert frequencies and the domain specialisation against its null."""
    settings = measure_settings(preset, windows)
    path = run_dir / "measures.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["settings"] == settings:
            return cached
    config, state = load_export(run_dir / "model.pt")
    torch_device = resolve_device(device)
    model = MoETransformer(config).to(torch_device)
    model.load_state_dict(state)
    held_out = eval_batches(
        windows.held_out, config.micro_batch_size, config.seq_len, preset.perplexity_tokens
    )
    on_held_out = evaluate(model, held_out, config, torch_device, ParallelLayout())
    leakage_windows = torch.cat([inputs for inputs, _ in held_out])[:LEAKAGE_SEQUENCES]
    measures: dict = {
        "settings": settings,
        "perplexity": float(torch.tensor(on_held_out["val_loss"]).exp()),
        "maxvio_held_out": on_held_out["maxvio_global"],
        "future_token_leakage": future_token_leakage(
            model, leakage_windows.to(torch_device), position=config.seq_len // 2
        ),
    }
    if config.balancing == "expert_choice":
        return _write_measures(path, measures)
    counts = window_counts(model, windows.balance.to(torch_device))
    torch.save(counts, run_dir / "counts.pt")
    per_layer = balance_per_layer(counts)
    measures["maxvio_global_per_layer"] = per_layer
    measures["maxvio_global"] = sum(per_layer) / len(per_layer)
    measures["computation_batch"] = {
        str(size): value
        for size, value in computation_batch_curve(
            counts, preset.curve_sizes, preset.curve_groups
        ).items()
    }
    ep_sizes = [ranks * m for ranks in preset.expert_parallel_ranks for m in MICRO_BATCHES]
    measures["consecutive_batches"] = {
        str(size): value
        for size, value in consecutive_batch_maxvio(
            counts[: preset.expert_parallel_windows], sorted(set(ep_sizes))
        ).items()
    }
    scored = windows.by_domain if windows.domains else windows.balance
    scores = topk_score_sum(model, scored.to(torch_device))
    measures["topk_score_sum_per_layer"] = scores
    measures["topk_score_sum"] = sum(scores) / len(scores)
    if len(windows.domains) >= 2:
        by_domain = window_counts(model, windows.by_domain.to(torch_device))
        labels = windows.domain_labels
        measures["expert_frequency_by_domain"] = domain_frequencies(
            by_domain, labels, len(windows.domains)
        ).tolist()
        measures["domain_specialisation"] = specialisation_against_null(
            by_domain, labels, preset.null_permutations
        )
    return _write_measures(path, measures)


def balance_per_layer(counts: torch.Tensor) -> list[float]:
    """MaxVio of each layer's counts summed over every window: MaxVio_global in distribution."""
    return max_violation(counts.sum(dim=0)).tolist()


def _write_measures(path: Path, measures: dict) -> dict:
    atomic_write_text(path, json.dumps(measures, indent=2) + "\n")
    return measures


@cache
def preset_windows(preset_name: str) -> StudyWindows:
    """The windows of a preset, drawn once per process."""
    preset = STUDY_PRESETS[preset_name]
    return study_windows(
        preset.train, preset.balance_windows, preset.domains, preset.windows_per_domain
    )


def train_and_measure(task: tuple[str, str, int, Path, str, bool]) -> tuple[str, int, dict]:
    """One run of the study, trained (or read from its cache) and measured: (arm, seed,
    {"summary", "measures"}). A task names its preset, so a worker process rebuilds the rest."""
    preset_name, name, seed, out_dir, device, progress = task
    preset = STUDY_PRESETS[preset_name]
    arm = strategies(preset.train, preset.seeds, preset.bias_warmup_steps)[name]
    run_dir = out_dir / "runs" / name / f"seed{seed}"
    summary = run_arm(arm.run_config(seed), run_dir, device, progress, f"{name} seed {seed}")
    measures = measure_run(run_dir, preset, preset_windows(preset_name), device)
    return name, seed, {"summary": summary, "measures": measures}


def train_and_measure_all(
    preset_name: str, out_dir: Path, device: str, progress: bool, jobs: int
) -> dict[tuple[str, int], dict]:
    """Every run of the preset, seed by seed (the first seed of every arm first), by ``jobs``
    worker processes sharing the CPU's threads (one process: here, with a progress bar)."""
    preset = STUDY_PRESETS[preset_name]
    arms = strategies(preset.train, preset.seeds, preset.bias_warmup_steps)
    order = sorted(
        ((seed, name) for name, arm in arms.items() for seed in arm.seeds),
        key=lambda pair: (pair[0] - preset.train.seed, list(arms).index(pair[1])),
    )
    tasks = [
        (preset_name, name, seed, out_dir, device, progress and jobs == 1) for seed, name in order
    ]

    def collect(results) -> dict[tuple[str, int], dict]:
        done = {}
        for name, seed, result in results:
            done[name, seed] = result
            if progress:
                print(f"[{len(done)}/{len(tasks)}] {name} seed {seed} done", flush=True)
        return done

    if jobs == 1:
        return collect(map(train_and_measure, tasks))
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return collect(pool.imap_unordered(train_and_measure, tasks))


def run_study(
    preset_name: str, out_dir: Path, device: str = "cpu", progress: bool = True, jobs: int = 1
) -> dict:
    """Trains and measures every run of ``strategies`` under ``out_dir/runs/<arm>/seed<s>``
    (``jobs`` at a time), runs the Table-2 pair's first seed on expert-parallel ranks, draws
    the findings; writes ``out_dir/results.json`` and returns it: {"preset", "design",
    "domains", "runs": {arm: {seed: {"summary", "measures"}}}, "balanced_router": {size:
    {"mean", "low", "high"}}, "expert_parallel": {ranks: {arm: {size: MaxVio}}}, "findings":
    [...]}."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    preset = STUDY_PRESETS[preset_name]
    windows = preset_windows(preset_name)
    arms = strategies(preset.train, preset.seeds, preset.bias_warmup_steps)
    trained = train_and_measure_all(preset_name, out_dir, device, progress, jobs)
    runs = {
        name: {str(seed): trained[name, seed] for seed in arm.seeds} for name, arm in arms.items()
    }
    model = preset.train.model
    study = {
        "preset": preset_name,
        "design": design(preset, arms),
        "domains": windows.domains,
        "runs": runs,
        "balanced_router": {
            str(size): value
            for size, value in computation_batch_curve(
                balanced_router_counts(
                    preset.balance_windows,
                    preset.train.seq_len,
                    model.num_layers,
                    model.num_experts,
                    model.topk,
                ),
                preset.curve_sizes,
                preset.curve_groups,
            ).items()
        },
        "expert_parallel": {
            str(ranks): run_expert_parallel(
                [out_dir / "runs" / name / f"seed{arms[name].seeds[0]}" for name in TABLE_PAIR],
                windows.balance[: preset.expert_parallel_windows],
                ranks,
                out_dir / "runs",
            )
            for ranks in preset.expert_parallel_ranks
        },
    }
    study["findings"] = findings(study)
    atomic_write_text(out_dir / "results.json", json.dumps(study, indent=2) + "\n")
    return study


def design(preset: StudyPreset, arms: dict[str, Arm]) -> dict:
    """What the report states of the study's design: arms and their seeds, the windows."""
    return {
        "arms": {name: list(arm.seeds) for name, arm in arms.items()},
        "steps": preset.train.steps,
        "tokens_per_step": preset.train.tokens_per_step,
        "bias_warmup_steps": preset.bias_warmup_steps,
        "perplexity_tokens": preset.perplexity_tokens,
        "balance_windows": preset.balance_windows,
        "seq_len": preset.train.seq_len,
        "curve_sizes": preset.curve_sizes,
        "large_batches": list(preset.large_batches),
        "curve_groups": preset.curve_groups,
        "windows_per_domain": preset.windows_per_domain,
        "null_permutations": preset.null_permutations,
        "expert_parallel_windows": preset.expert_parallel_windows,
    }
