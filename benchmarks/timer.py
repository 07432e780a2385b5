"""The shared timer and result writer of every benchmark.

Medians over repeats after warm-up. On CUDA, kernel time comes from CUDA events with the L2
cache flushed before each repeat; on the CPU, wall time from perf_counter.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


def measure(
    fn: Callable[[], object], device: str = "cpu", warmup: int = 2, repeats: int = 7
) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        for _ in range(repeats):
            flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(times), min(times), repeats)


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def save(name: str, rows: list[dict[str, object]], columns: list[str], title: str) -> None:
    """Writes results/<name>.json and results/<name>.md (a table of ``columns``)."""
    RESULTS.mkdir(exist_ok=True)
    env = machine()
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": env, "rows": rows}, indent=2) + "\n"
    )
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
