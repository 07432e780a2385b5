"""The study's Markdown report: every number in it read from the runs' results."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.atomic import atomic_write_text
from ..train.plots import plot_runs
from .findings import findings, mean, number, seed_noise
from .run import COMPUTATION_BATCH_SIZES
from .strategies import SPLITS, split_pair

PLOTS = (
    "loss.png",
    "maxvio.png",
    "maxvio_by_computation_batch.png",
    "expert_frequency_by_domain.png",
)


def write_plots(study: dict, out_dir: Path) -> list[str]:
    """``loss.png`` and ``maxvio.png`` (every arm's training history),
    ``maxvio_by_computation_batch.png`` (MaxVio against the computation batch size) and, where
    the held-out text has domains, ``expert_frequency_by_domain.png``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = study["arms"]
    histories = {
        name: [json.loads(line) for line in (out_dir / "runs" / name / "history.jsonl").open()]
        for name in results
    }
    plot_runs(histories, out_dir)
    figure, axis = plt.subplots(figsize=(9.5, 4.5))
    axis.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per arm (12 of them)
    for name, arm in results.items():
        by_size = arm["measures"]["maxvio_by_computation_batch"]
        axis.plot(
            COMPUTATION_BATCH_SIZES,
            [by_size[str(size)] for size in COMPUTATION_BATCH_SIZES],
            "o-",
            label=name,
            markersize=3,
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("computation batch (sequences)")
    axis.set_ylabel("MaxVio")
    axis.set_title("MaxVio per computation batch (held-out text)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(out_dir / PLOTS[2], dpi=100)
    plt.close(figure)
    if not study["domains"]:
        return list(PLOTS[:3])
    _plot_domain_frequencies(study, out_dir / PLOTS[3], plt)
    return list(PLOTS)


def _plot_domain_frequencies(study: dict, path: Path, plt) -> None:
    """Each domain's expert frequencies in the last MoE layer, micro- against global-batch
    balance on the same micro-batches (arXiv 2501.11873's Figure of expert selection per
    domain)."""
    names = split_pair(SPLITS[-1])
    figure, axes = plt.subplots(1, len(names), figsize=(11, 0.25 * len(study["domains"]) + 1.5))
    for axis, name in zip(axes, names, strict=True):
        by_domain = study["arms"][name]["measures"]["expert_frequency_by_domain"]
        image = axis.imshow(
            [by_domain[domain][-1] for domain in study["domains"]],
            cmap="viridis",
            vmin=0,
            aspect="auto",
        )
        axis.set_yticks(range(len(study["domains"])), study["domains"], fontsize=7)
        axis.set_xlabel("expert")
        axis.set_title(f"{name}: last MoE layer", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.04, label="share of the domain's routing")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _optional(value: float | None) -> str:
    return "n/a" if value is None else number(value)


def write_report(study: dict, command: str, out_dir: Path) -> Path:
    """Writes ``out_dir/report.md`` and its plots: the findings; per arm, validation
    perplexity, MaxVio_global (held-out set), MaxVio_batch (mean over training), future-token
    leakage, top-k score sum (mean over layers) and domain specialisation; MaxVio by
    computation batch size; the top-k score sum per layer; MaxVio by computation batch size
    measured on expert-parallel ranks."""
    results = study["arms"]
    plots = write_plots(study, out_dir)
    lines = [
        f"# Balance study ({study['preset']} preset)",
        "",
        f"Regenerate with `{command}`. Every arm trains the same model on the same data, seed "
        "and token budget; only the balancing differs.",
        "",
        "## Findings",
        "",
        "Verdicts at this scale, from the numbers below: never tuned to agree with the papers.",
        seed_noise(study),
        "",
        *findings(study),
        "",
        "## Arms",
        "",
        "Top-k score sum: the k largest routing probabilities of a token, summed, averaged over "
        "tokens and layers. Domain specialisation: how far each domain's expert frequencies are "
        "from their mean over domains (total variation, averaged over domains and layers), on "
        f"the held-out text of {len(study['domains'])} domains: {', '.join(study['domains'])}.",
        "",
        "| arm | val perplexity | MaxVio_global | MaxVio_batch | future-token leakage | "
        "top-k score sum | domain specialisation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in results.items():
        summary, measures = arm["summary"], arm["measures"]
        lines.append(
            f"| {name} | {number(summary['val_perplexity'])} | "
            f"{number(summary['maxvio_global'])} | {number(summary['maxvio_batch'])} | "
            f"{number(measures['future_token_leakage'])} | "
            f"{number(mean(measures['topk_score_sum']))} | "
            f"{_optional(measures['domain_specialisation'])} |"
        )
    sizes = [str(size) for size in COMPUTATION_BATCH_SIZES]
    lines += [
        "",
        "## MaxVio by computation batch size (held-out sequences)",
        "",
        "| arm | " + " | ".join(sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, arm in results.items():
        by_size = arm["measures"]["maxvio_by_computation_batch"]
        lines.append(f"| {name} | " + " | ".join(number(by_size[s]) for s in sizes) + " |")
    layers = range(1, len(next(iter(results.values()))["measures"]["topk_score_sum"]) + 1)
    lines += [
        "",
        "## Top-k score sum per MoE layer (held-out sequences)",
        "",
        "| arm | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for name, arm in results.items():
        per_layer = arm["measures"]["topk_score_sum"]
        lines.append(f"| {name} | " + " | ".join(map(number, per_layer)) + " |")
    lines += [
        "",
        "## MaxVio by computation batch size on expert-parallel ranks",
        "",
        "Each arm's model with its experts sharded over every rank (Gloo), each rank routing 1 "
        "or 2 held-out sequences per forward: MaxVio of the rows the ranks' experts received, "
        "against the one-process grouping above.",
        "",
        "| ranks | arm | computation batch (sequences) | MaxVio on the ranks | one process |",
        "|---|---|---|---|---|",
    ]
    for ranks, arms in study["expert_parallel"].items():
        for name, by_size in arms.items():
            one_process = results[name]["measures"]["maxvio_by_computation_batch"]
            lines += [
                f"| {ranks} | {name} | {size} | {number(value)} | {number(one_process[size])} |"
                for size, value in by_size.items()
            ]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
