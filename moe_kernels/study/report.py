"""The study's Markdown report and plots: every number in them read from ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.atomic import atomic_write_text
from ..train.plots import plot_runs
from .findings import first_seed, interval_text, measured, number, paired, per_seed
from .stats import mean_interval
from .strategies import BALANCE_GROUPS, QWEN_ALPHA, TABLE_PAIR, aux_arm, group_arm

PLOTS = (
    "frontier.png",
    "maxvio_by_computation_batch.png",
    "loss.png",
    "maxvio.png",
    "expert_frequency_by_domain.png",
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _token_choice(study: dict) -> list[str]:
    return [arm for arm in study["runs"] if arm != "expert_choice"]


def _sweep(study: dict) -> list[tuple[int, str]]:
    """(sequences per balance group, arm) of the balance-batch sweep, the whole micro-batch
    last."""
    batch = study["design"]["tokens_per_step"] // study["design"]["seq_len"]
    return [(g, group_arm(g)) for g in BALANCE_GROUPS] + [(batch, aux_arm(QWEN_ALPHA))]


def plot_frontier(study: dict, path: Path) -> None:
    """Figure 2: perplexity against MaxVio_global, every run a point, each arm's mean a
    larger one; the aux arms' means joined in order of alpha."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    colours = iter(plt.cm.tab10.colors)
    aux_means = []
    for arm in _token_choice(study):
        x, y = per_seed(study, arm, "maxvio_global"), per_seed(study, arm, "perplexity")
        colour = next(colours)
        marker = "s" if arm.startswith("loss_free") else "o"
        axis.scatter(x, y, color=colour, marker=marker, s=14, alpha=0.5)
        mean = (sum(x) / len(x), sum(y) / len(y))
        axis.scatter(*mean, color=colour, marker=marker, s=70, edgecolor="black", label=arm)
        if arm.startswith("aux_loss_"):
            aux_means.append((float(arm.removeprefix("aux_loss_")), mean))
    aux_means.sort()
    axis.plot([m[0] for _, m in aux_means], [m[1] for _, m in aux_means], "k--", lw=1, alpha=0.6)
    axis.set_xscale("log")
    axis.set_xlabel("MaxVio_global (random training windows)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("Balance-perplexity frontier: every seed a point, arm means outlined")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def mean_curve(study: dict, arm: str, key: str = "mean") -> list[float]:
    """An arm's computation-batch curve (``key``: "mean", "low" or "high" of the draws),
    averaged over its seeds, at each of the design's sizes."""
    curves = [run["measures"]["computation_batch"] for run in study["runs"][arm].values()]
    return [
        sum(c[str(s)][key] for c in curves) / len(curves) for s in study["design"]["curve_sizes"]
    ]


def plot_computation_batches(study: dict, path: Path) -> None:
    """Figure 5: MaxVio against the computation batch, mean over seeds with the 2.5-97.5
    percentile band of the draws, every window's plateau dotted, and the perfectly balanced
    router for reference."""
    plt = _pyplot()
    xs = study["design"]["curve_sizes"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for arm, colour in zip((*TABLE_PAIR, aux_arm(QWEN_ALPHA)), plt.cm.tab10.colors, strict=False):
        mean, low, high = (mean_curve(study, arm, key) for key in ("mean", "low", "high"))
        seeds = len(study["runs"][arm])
        axis.plot(xs, mean, "o-", color=colour, markersize=3, label=f"{arm} ({seeds} seeds)")
        axis.fill_between(xs, low, high, color=colour, alpha=0.2)
        axis.axhline(mean[-1], color=colour, ls=":", lw=1)
    router = study["balanced_router"]
    axis.plot(xs, [router[str(s)]["mean"] for s in xs], "k--", lw=1, label="perfectly balanced")
    axis.axvspan(*study["design"]["large_batches"], color="grey", alpha=0.08)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("computation batch (random training windows)")
    axis.set_ylabel("MaxVio")
    axis.set_title("MaxVio per computation batch; shaded: the criterion's range")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_domain_frequencies(study: dict, path: Path) -> None:
    """Each domain's expert frequencies in the last MoE layer under each balance group (first
    seed), on one colour scale."""
    plt = _pyplot()
    sweep = _sweep(study)
    maps = [
        [f[-1] for f in next(iter(study["runs"][arm].values()))["measures"][
            "expert_frequency_by_domain"
        ]]
        for _, arm in sweep
    ]  # fmt: skip
    top = max(max(max(row) for row in m) for m in maps)
    figure, axes = plt.subplots(
        1, len(sweep), figsize=(4.5 * len(sweep), 0.3 * len(study["domains"]) + 1.8), sharey=True
    )
    axes[0].set_yticks(range(len(study["domains"])), study["domains"], fontsize=7)
    for axis, (group, arm), image in zip(axes, sweep, maps, strict=True):
        shown = axis.imshow(image, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        axis.set_xlabel("expert")
        axis.set_title(f"balance group {group} ({arm})", fontsize=8)
    figure.colorbar(shown, ax=list(axes), fraction=0.03, label="share of the domain's routing")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_plots(study: dict, out_dir: Path) -> list[str]:
    """The frontier, the computation-batch curves, every arm's loss and MaxVio history (its
    first seed) and, with domains, the expert frequencies by domain; returns their names."""
    plot_frontier(study, out_dir / PLOTS[0])
    plot_computation_batches(study, out_dir / PLOTS[1])
    histories = {}
    for arm in study["runs"]:
        seed = first_seed(study, arm)
        lines = (out_dir / "runs" / arm / f"seed{seed}" / "history.jsonl").open()
        histories[arm] = [json.loads(line) for line in lines]
    plot_runs(histories, out_dir)
    if not study["domains"]:
        return list(PLOTS[:4])
    plot_domain_frequencies(study, out_dir / PLOTS[4])
    return list(PLOTS)


def _findings_section(study: dict) -> list[str]:
    lines = ["## Findings", ""]
    for finding in study["findings"]:
        lines += [
            f"### {finding['number']}. {finding['claim']}",
            "",
            f"**Criterion.** {finding['criterion']}",
            "",
            f"**Verdict: {finding['verdict']}.**",
            "",
        ]
        if finding["parts"]:
            lines += [
                "| part | quantity (paper's claim > 0) | seeds | mean [95% interval] | sd | "
                "paper's effect | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            for part in finding["parts"]:
                percent = part["relative"]
                sd = part["interval"]["sd"] * (100 if percent else 1)
                lines.append(
                    f"| {part['name']} | {part['quantity']} | {part['interval']['n']} | "
                    f"{interval_text(part['interval'], percent)} | "
                    f"{number(sd) + ('%' if percent else '')} | "
                    f"{number(100 * part['paper_effect']) + '%' if percent else number(part['paper_effect'])} | "
                    f"{part['verdict']} |"
                )
            lines.append("")
        lines += [*finding["notes"], ""] if finding["notes"] else []
    return lines


def _arms_section(study: dict) -> list[str]:
    lines = [
        "## Arms",
        "",
        "Means over seeds, with 95% t-intervals where an arm has several. MaxVio_global: over "
        f"{study['design']['balance_windows']} random training windows; held out: over the "
        f"held-out documents' {study['design']['perplexity_tokens']} tokens, as perplexity. "
        "MaxVio_batch: each step's, over the last tenth of training. Top-k score sum: the k "
        "largest routing probabilities of a token, summed, averaged over tokens and layers (of "
        "the domain windows). Specialisation: domain specialisation minus its permutation null.",
        "",
        "| arm | seeds | perplexity | MaxVio_global | MaxVio_global held out | MaxVio_batch | "
        "top-k score sum | specialisation | future-token leakage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, runs in study["runs"].items():

        def cell(key: str, arm=arm) -> str:
            if not measured(study, arm, key):
                return "n/a"
            values = per_seed(study, arm, key)
            if len(values) == 1:
                return number(values[0])
            return interval_text(mean_interval(values).to_dict())

        batch = [float(run["summary"]["maxvio_batch_final"]) for run in runs.values()]
        leak = max(float(run["measures"]["future_token_leakage"]) for run in runs.values())
        cells = [
            cell("perplexity"),
            cell("maxvio_global"),
            cell("maxvio_held_out"),
            number(sum(batch) / len(batch)),
            cell("topk_score_sum"),
            cell("domain_specialisation.corrected"),
            number(leak),
        ]
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _curve_section(study: dict) -> list[str]:
    sizes = [str(s) for s in study["design"]["curve_sizes"]]
    lines = [
        "## MaxVio by computation batch (random training windows)",
        "",
        f"Mean over {study['design']['curve_groups']} random computation batches of n windows, "
        f"then over seeds; the last column is every window at once (the plateau).",
        "",
        "| arm | " + " | ".join(sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for arm in _token_choice(study):
        lines.append(f"| {arm} | " + " | ".join(map(number, mean_curve(study, arm))) + " |")
    router = study["balanced_router"]
    lines.append(
        "| perfectly balanced router | "
        + " | ".join(number(router[s]["mean"]) for s in sizes)
        + " |"
    )
    return lines


def _sweep_section(study: dict) -> list[str]:
    lines = [
        "## Balance batch (arXiv 2501.11873)",
        "",
        f"The aux loss at alpha {QWEN_ALPHA} over balance groups of g sequences, equal compute; "
        "paired differences against the whole micro-batch's arm.",
        "",
        "| sequences per balance group | arm | perplexity | MaxVio_global | top-k score sum | "
        "specialisation | perplexity vs whole batch |",
        "|---|---|---|---|---|---|---|",
    ]
    whole = _sweep(study)[-1][1]
    for group, arm in _sweep(study):
        means = [
            number(sum(v) / len(v))
            for v in (
                per_seed(study, arm, key)
                for key in ("perplexity", "maxvio_global", "topk_score_sum")
            )
        ]
        special = (
            number(
                sum(per_seed(study, arm, "domain_specialisation.corrected"))
                / len(study["runs"][arm])
            )
            if study["domains"]
            else "n/a"
        )
        versus = (
            interval_text(
                paired(study, "perplexity", arm, whole, relative=True).to_dict(), percent=True
            )
            if arm != whole
            else "-"
        )
        lines.append(f"| {group} | {arm} | " + " | ".join(means) + f" | {special} | {versus} |")
    return lines


def _expert_parallel_section(study: dict) -> list[str]:
    if not study["expert_parallel"]:
        return []
    lines = [
        "## Expert-parallel check",
        "",
        f"Each arm's first-seed model with its experts sharded over the ranks (Gloo), each rank "
        f"routing 1 or 2 of the first {study['design']['expert_parallel_windows']} training "
        "windows per forward: MaxVio of the rows the ranks' experts received, against the "
        "same windows grouped consecutively in one process.",
        "",
        "| ranks | arm | computation batch (windows) | MaxVio on the ranks | one process |",
        "|---|---|---|---|---|",
    ]
    for ranks, by_arm in study["expert_parallel"].items():
        for arm, by_size in by_arm.items():
            run = study["runs"][arm][first_seed(study, arm)]
            one_process = run["measures"]["consecutive_batches"]
            lines += [
                f"| {ranks} | {arm} | {size} | {number(value)} | {number(one_process[size])} |"
                for size, value in by_size.items()
            ]
    return lines


def write_report(study: dict, command: str, out_dir: Path) -> Path:
    """Writes ``out_dir/report.md`` and its plots from ``run_study``'s results."""
    plots = write_plots(study, out_dir)
    design = study["design"]
    seeds = ", ".join(f"{arm} {len(s)}" for arm, s in design["arms"].items())
    lines = [
        f"# Balance study ({study['preset']} preset)",
        "",
        f"Regenerate with `{command}`. Every arm trains the same model on the same data and "
        f"token budget ({design['steps']} steps of {design['tokens_per_step']} tokens) from the "
        f"same paired seeds; only the balancing differs. Seeds per arm: {seeds}. Loss-free "
        f"'warm' moves its bias at 1e-2 for {design['bias_warmup_steps']} steps, then at the "
        "paper's 1e-3; the Table-2 pair's loss-free arm keeps 1e-2 throughout, since at 1e-3 "
        "the bias loses the balance while the learning rate is high and regains it only near "
        "the last step (the MaxVio curves of maxvio.png). Balance is measured on random "
        "windows of the training text (the "
        "distribution the routers trained on), perplexity on held-out documents. Numbers are "
        "what the runs gave: none was tuned to agree with the papers.",
        "",
        *_findings_section(study),
        *_arms_section(study),
        "",
        *_curve_section(study),
        "",
        *_sweep_section(study),
        "",
        *_expert_parallel_section(study),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
