"""What every benchmark shares: the command line, the timer and the result writer.

Medians over repeats after warm-up. On CUDA, kernel time comes from CUDA events with the L2
cache flushed before each repeat; on the CPU, wall time from perf_counter.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --smoke's sizes: tiny matrices, but each shape keeps its experts, top-k and groups, so every
# code path (a zero-row expert, group-limited routing, 256 experts) still runs.
SMOKE = {"num_tokens": 256, "hidden": 64, "ffn": 32}

ShapeT = TypeVar("ShapeT")


def parser(doc: str, dtypes: Sequence[str], dtype: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes (``parse`` reads them); a script adds its own."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=dtype, choices=sorted(dtypes))
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default: per shape)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny shapes ({SMOKE}, real expert counts), one warm-up and one repeat: every "
        "code path in seconds, to prove the script runs (the numbers mean nothing)",
    )
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line; --smoke times a single repeat, on one thread: tiny shapes gain nothing
    from threads, and on a busy machine each parallel region would wait for a descheduled one
    (3x the time on 2 shared cores)."""
    args = p.parse_args()
    if args.smoke:
        args.repeats = 1
        torch.set_num_threads(1)
    return args


def sized(shape: ShapeT, args: argparse.Namespace) -> ShapeT:
    """``shape`` (a dataclass with ``hidden``, ``ffn`` and maybe ``num_tokens`` fields) with the
    sizes of the command line: --smoke's, then --tokens."""
    sizes = dict(SMOKE) if args.smoke else {}
    if args.tokens is not None:
        sizes["num_tokens"] = args.tokens
    names = {field.name for field in fields(shape)}
    return replace(shape, **{name: value for name, value in sizes.items() if name in names})


def num_tokens(args: argparse.Namespace, default: int) -> int:
    """Tokens per batch for a script whose shapes hold none: --tokens, --smoke's, or default."""
    if args.tokens is not None:
        return args.tokens
    return SMOKE["num_tokens"] if args.smoke else default


def randn(*size: int, generator: torch.Generator, dtype: torch.dtype, scale: float = 1.0):
    """Normal values made on the generator's device: a real model's expert weights made on the
    CPU would take minutes and tens of GB of host memory."""
    return torch.randn(size, generator=generator, device=generator.device, dtype=dtype).mul_(scale)


def supported(fn: Callable[[], object]) -> Callable[[], object] | None:
    """fn, or None when this torch cannot run it on this device and dtype (torch._grouped_mm's
    limits): a missing baseline is recorded as None, not a crash."""
    try:
        fn()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return fn


@contextmanager
def unit(name: str, failed: list[str]) -> Iterator[None]:
    """Runs one unit of a benchmark (an op, a shape): when it raises, prints the error, adds
    ``name`` to ``failed`` and goes on, so that one failure (a shape out of memory, a kernel
    error) still leaves the table of the rest; ``save`` then exits non-zero."""
    try:
        yield
    except Exception:
        traceback.print_exc()
        failed.append(name)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


def measure(
    fn: Callable[[], object], device: str = "cpu", warmup: int | None = None, repeats: int = 7
) -> Timing:
    """Median time of ``fn``; by default 2 warm-up calls, 1 for at most 2 repeats (slow
    implementations, --smoke)."""
    return measure_in_turns({"fn": fn}, device, warmup, {"fn": repeats})["fn"]


def measure_in_turns(
    fns: dict[str, Callable[[], object]],
    device: str = "cpu",
    warmup: int | None = None,
    repeats: dict[str, int] | None = None,
) -> dict[str, Timing]:
    """Median time of each of ``fns`` (``repeats[name]`` calls, 7 by default), timed in turns:
    each round calls every function that still has repeats to make, starting one further along
    each round. A shared machine's slow stretches (here the hypervisor steals up to a tenth of
    the 2 cores' time, in bursts of seconds) then fall on every implementation alike, not on
    whichever happened to be timed then. Warm-up as ``measure``'s, per function."""
    repeats = {name: (repeats or {}).get(name, 7) for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup if warmup is not None else 1 if repeats[name] <= 2 else 2):
            fn()
    flush = None
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(max(repeats.values(), default=0)):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if len(times[name]) < repeats[name]:
                times[name].append(_time_once(fns[name], flush))
    return {name: Timing(statistics.median(t), min(t), repeats[name]) for name, t in times.items()}


def _time_once(fn: Callable[[], object], cuda_flush: torch.Tensor | None) -> float:
    """One call's time in ms: CUDA events after flushing the L2 cache, or wall time."""
    if cuda_flush is None:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3
    cuda_flush.zero_()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def machine() -> dict[str, object]:
    env: dict[str, object] = {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.update(
            gpu=torch.cuda.get_device_name(),
            gpu_capability=f"{major}.{minor}",
            cuda=torch.version.cuda,
        )
    return env


def _cpu_model() -> str | None:
    """The CPU's model name as lscpu gives it (Linux /proc/cpuinfo), None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def save(
    name: str,
    rows: list[dict[str, object]],
    columns: list[str],
    title: str,
    out: Path = RESULTS,
    failed: Sequence[str] = (),
) -> None:
    """Writes <out>/<name>.json and <out>/<name>.md (a table of ``columns``) and prints the
    table; then exits with status 1 if any unit ``failed``."""
    out.mkdir(parents=True, exist_ok=True)
    env = machine()
    record = {"machine": env, "rows": rows} | ({"failed": list(failed)} if failed else {})
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    if failed:
        lines += ["", "Failed: " + ", ".join(failed)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        sys.exit(f"{name}: {len(failed)} failed: {', '.join(failed)}")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
