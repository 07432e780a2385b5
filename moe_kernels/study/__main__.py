"""``python -m moe_kernels.study [--preset default|quick|gpu] [--out DIR]``: trains every arm
from each of its seeds (cached, resumable), measures them and writes the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import write_report
from .run import STUDY_PRESETS, run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-study", description=__doc__)
    parser.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="default")
    parser.add_argument("--quick", action="store_true", help="the quick preset (a few minutes)")
    parser.add_argument("--out", type=Path, default=None, help="default results/study[-PRESET]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, sharing the CPU's threads"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    suffix = "" if preset == "default" else f"-{preset}"
    out = args.out or Path("results") / f"study{suffix}"
    study = run_study(preset, out, args.device, progress=not args.no_progress, jobs=args.jobs)
    command = "python -m moe_kernels.study" + (f" --preset {preset}" if suffix else "")
    if args.device != "cpu":
        command += f" --device {args.device}"
    print(f"report: {write_report(study, command, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
