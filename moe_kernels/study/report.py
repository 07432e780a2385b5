"""The study's Markdown report: every number in it read from the runs' results."""

from __future__ import annotations

from pathlib import Path

from ..train.atomic import atomic_write_text
from .run import COMPUTATION_BATCH_SIZES


def _number(value: float) -> str:
    return f"{value:.4g}"


def write_report(results: dict, preset: str, command: str, out_dir: Path) -> Path:
    """Writes ``out_dir/report.md``: per arm, validation perplexity, MaxVio_global (held-out
    set), MaxVio_batch (mean over training) and future-token leakage; then MaxVio by
    computation batch size."""
    lines = [
        f"# Balance study ({preset} preset)",
        "",
        f"Regenerate with `{command}`. Every arm trains the same model on the same data, seed "
        "and token budget; only the balancing differs.",
        "",
        "| arm | val perplexity | MaxVio_global | MaxVio_batch | future-token leakage |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results.items():
        summary, measures = arm["summary"], arm["measures"]
        lines.append(
            f"| {name} | {_number(summary['val_perplexity'])} | "
            f"{_number(summary['maxvio_global'])} | {_number(summary['maxvio_batch'])} | "
            f"{_number(measures['future_token_leakage'])} |"
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
        lines.append(f"| {name} | " + " | ".join(_number(by_size[s]) for s in sizes) + " |")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
