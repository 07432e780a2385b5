"""PNG plots of training runs: loss and MaxVio against step, one line per strategy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _series(history: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(row["step"]), float(row[key])) for row in history if key in row]
    return [step for step, _ in points], [value for _, value in points]


def plot_runs(histories: Mapping[str, Sequence[Mapping[str, object]]], out_dir: Path) -> list[Path]:
    """Writes loss.png (training and validation loss) and maxvio.png (MaxVio_batch during
    training, MaxVio_global at each evaluation) comparing the runs named in ``histories``
    (strategy -> the rows of its history.jsonl). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {
        "loss.png": [("train_loss", "training loss", "-"), ("val_loss", "validation loss", "o--")],
        "maxvio.png": [
            ("maxvio_batch", "MaxVio_batch (training)", "-"),
            ("maxvio_global", "MaxVio_global (validation)", "o--"),
        ],
    }
    written = []
    for name, series in panels.items():
        figure, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
        for axis, (key, title, style) in zip(axes[0], series, strict=True):
            axis.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per run, up to 20
            for strategy, history in histories.items():
                steps, values = _series(history, key)
                if steps:
                    axis.plot(steps, values, style, label=strategy, markersize=4)
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        # One legend for both panels, beside them: many runs would cover the curves.
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
