"""The study's Markdown report: every number in it read from the runs' results."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.atomic import atomic_write_text
from ..train.plots import plot_runs
from .findings import findings, number
from .run import COMPUTATION_BATCH_SIZES

PLOTS = ("loss.png", "maxvio.png", "maxvio_by_computation_batch.png")


def write_plots(results: dict, out_dir: Path) -> None:
    """``loss.png`` and ``maxvio.png`` (every arm's training history) and
    ``maxvio_by_computation_batch.png`` (MaxVio against the computation batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {
        name: [json.loads(line) for line in (out_dir / "runs" / name / "history.jsonl").open()]
        for name in results
    }
    plot_runs(histories, out_dir)
    figure, axis = plt.subplots(figsize=(7, 4.5))
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
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out_dir / PLOTS[2], dpi=100)
    plt.close(figure)


def write_report(results: dict, preset: str, command: str, out_dir: Path) -> Path:
    """Writes ``out_dir/report.md`` and its plots: per arm, validation perplexity,
    MaxVio_global (held-out set), MaxVio_batch (mean over training) and future-token leakage;
    then MaxVio by computation batch size."""
    write_plots(results, out_dir)
    lines = [
        f"# Balance study ({preset} preset)",
        "",
        f"Regenerate with `{command}`. Every arm trains the same model on the same data, seed "
        "and token budget; only the balancing differs.",
        "",
        "## Findings",
        "",
        "Verdicts at this scale, from the numbers below: never tuned to agree with the papers.",
        "",
        *findings(results),
        "",
        "## Arms",
        "",
        "| arm | val perplexity | MaxVio_global | MaxVio_batch | future-token leakage |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results.items():
        summary, measures = arm["summary"], arm["measures"]
        lines.append(
            f"| {name} | {number(summary['val_perplexity'])} | "
            f"{number(summary['maxvio_global'])} | {number(summary['maxvio_batch'])} | "
            f"{number(measures['future_token_leakage'])} |"
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
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in PLOTS]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
