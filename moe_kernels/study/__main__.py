"""``python -m moe_kernels.study [--quick] [--out DIR]``: trains every arm (cached, resumable),
measures them and writes the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import write_report
from .run import run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-study", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick preset (a few minutes)")
    parser.add_argument("--out", type=Path, default=None, help="default results/study[-quick]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "default"
    out = args.out or Path("results") / ("study-quick" if args.quick else "study")
    study = run_study(preset, out, args.device, progress=not args.no_progress)
    command = "python -m moe_kernels.study" + (" --quick" if args.quick else "")
    print(f"report: {write_report(study, command, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
