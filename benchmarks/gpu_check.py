"""The whole truth about the CUDA side in one command, for the rare minutes a GPU is lent.

    python benchmarks/gpu_check.py [--quick] [--dry-run] [--out DIR]     (make gpu-check)
    python benchmarks/gpu_check.py --stages build study                  (make gpu-study)

For a machine with a CUDA GPU and a torch already installed: no venv is made and nothing is
downloaded. Four stages, each with its own time budget; a stage that fails or runs out of time
is recorded as such and the next one still runs, so a partial run still leaves its results.

1. build: the extension in place (``setup.py build_ext --inplace``), against the installed
   torch, for the GPU's own architecture only (sm_90a on Hopper), on every core.
2. tests: the suite's ``cuda`` cases (every op family, the layer, the transformers patch).
3. sanitizer: ``launch_every_kernel.py`` checks that it launches every ``__global__`` kernel of
   csrc/, then runs under each compute-sanitizer tool (memcheck, racecheck, synccheck,
   initcheck) with torch's caching allocator off, so that an access past a tensor's end is
   outside any allocation.
4. benchmarks: each against its baseline in the same run (see each script), and the ``small``
   training preset's tokens/s.

One more stage runs only when named (``--stages``): ``study``, the balance study's ``gpu``
preset (``python -m moe_kernels.study --preset gpu --device cuda``), its report in
``study/`` of the output folder; with ``build`` first, under 8 minutes in all.

Everything lands in ``benchmarks/results/gpu/<device name>/`` (``--out``): each step's log,
the benchmarks' JSON and Markdown, ``build-summary.txt``, and ``summary.json`` /
``summary.md``, the one screen printed at the end. The exit status is non-zero when any stage
did not pass.

``--dry-run`` walks every stage on a machine without a GPU, with the CUDA parts replaced by
their CPU counterparts on tiny shapes: the build in the variant already configured (a no-op
when up to date), the emulated (``emu-forward``) cases of two test files, the kernel driver on
the CPU emulator under three thread schedules in place of the sanitizer's tools, and the
benchmarks' ``--smoke`` sizes on the CPU, and the study's ``quick`` preset. The test suite runs
it, so this script cannot rot between GPU visits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# On the emulator, the schedule that stands in for each tool: a race or a missing barrier gives
# different results under different thread orders.
# Seconds per stage (full, --quick): under 10 and 4 minutes in all on one H100/H200; the tests'
# full budget is a guess until a first run on a GPU times them (its log lists the slowest). The
# dry run emulates on a CPU of 2 cores and gets DRY_RUN_BUDGET_S for each.
BUDGETS_S = {"build": (140, 120), "tests": (180, 45), "sanitizer": (120, 35),
             "benchmarks": (120, 35), "study": (330, 330)}  # fmt: skip
DEFAULT_STAGES = ("build", "tests", "sanitizer", "benchmarks")
DRY_RUN_BUDGET_S = 600
EMULATED_TOOLS = {"memcheck": "forward", "racecheck": "reverse", "synccheck": "random",
                  "initcheck": "forward"}  # fmt: skip


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    status: str = "not run"  # passed, failed, timed out, not run
    seconds: float = 0.0


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float
    steps: list[Step]

    @property
    def status(self) -> str:
        statuses = {step.status for step in self.steps}
        for worst in ("failed", "timed out", "not run"):
            if worst in statuses:
                return worst
        return "passed"


def budget(stage: str, dry_run: bool, quick: bool) -> float:
    return DRY_RUN_BUDGET_S if dry_run else BUDGETS_S[stage][quick]


def gpu_arch() -> str:
    """The device's architecture in TORCH_CUDA_ARCH_LIST's spelling, with the "a" suffix that
    unlocks the architecture-specific instructions (wgmma, TMA) from Hopper on."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if major >= 9 else "")


def device_slug() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def build_stage(dry_run: bool, quick: bool) -> Stage:
    env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if not dry_run:
        env |= {"MOE_KERNELS_CUDA": "1", "TORCH_CUDA_ARCH_LIST": gpu_arch()}
    command = python("setup.py", "build_ext", "--inplace")
    return Stage("build", budget("build", dry_run, quick), [Step("build", command, env)])


def test_stage(dry_run: bool, quick: bool) -> Stage:
    if dry_run:
        selection = ["python_tests/test_histogram_bias.py", "python_tests/test_transpose_segments.py",
                     "-k", "emu-forward"]  # fmt: skip
    else:
        # Every cuda case; the CPU and emulated ones (some named after the CUDA kernel they
        # emulate) were proven on the CPU already.
        selection = ["python_tests", "-k", "(cuda or on_a_gpu) and not emu and not cpu"]
    # One line per test as it ends: a stage stopped at its budget, or by a kernel that hangs or
    # faults and so fails every later case, still shows which cases ran and how they ended.
    command = python("-m", "pytest", "-v", "-rfE", "--durations=15", "-p", "no:cacheprovider",
                     *selection)  # fmt: skip
    return Stage("tests", budget("tests", dry_run, quick), [Step("tests", command)])


def sanitizer_stage(dry_run: bool, quick: bool) -> Stage:
    driver = str(BENCHMARKS / "launch_every_kernel.py")
    device = "emu" if dry_run else "cuda"
    steps = [Step("coverage", python(driver, "--device", device, "--check-coverage"))]
    tools = SANITIZER_TOOLS[:2] if quick else SANITIZER_TOOLS
    for tool in tools:
        if dry_run:
            command = python(driver, "--device", "emu", "--schedule", EMULATED_TOOLS[tool])
        else:
            command = [compute_sanitizer(), "--tool", tool, "--error-exitcode", "1",
                       *python(driver, "--device", "cuda")]  # fmt: skip
        # Without the caching allocator every tensor is its own allocation, so memcheck sees an
        # access past a tensor's end.
        steps.append(Step(tool, command, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    return Stage("sanitizer", budget("sanitizer", dry_run, quick), steps)


def compute_sanitizer() -> str:
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found is None and root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            found = str(Path(root) / "bin" / "compute-sanitizer")
    return found or "compute-sanitizer"


def benchmark_stage(out: Path, dry_run: bool, quick: bool) -> Stage:
    """Real model sizes on the GPU (--smoke shrinks them on the CPU); --quick keeps the largest
    shapes with fewer repeats. fp32 ops run at Qwen3-MoE size: the reference's fp32 weight
    gradients at DeepSeek-V3 size would not fit in 141 GB."""
    common = ["--device", "cpu" if dry_run else "cuda", "--out", str(out)]
    common += ["--smoke"] if dry_run else ["--repeats", "3"] if quick else []
    models = (
        ["deepseek-v3", "mixtral-8x7b"] if quick else ["deepseek-v3", "qwen3-moe", "mixtral-8x7b"]
    )
    blocks = (
        ["deepseek-v3-671b"]
        if quick
        else [
            "deepseek-v3-671b",
            "qwen3-30b-a3b",
            "qwen3-next-80b-a3b",
            "gpt-oss-20b",
            "llama4-scout",
            "mixtral-8x7b",
        ]
    )

    def script(name: str, *args: str) -> list[str]:
        return python(str(BENCHMARKS / name), *common, *args)

    steps = [
        Step("ops-bf16", script("bench_ops.py", "--dtype", "bf16", "--shape", "deepseek-v3")),
        Step("grouped-gemm-bf16", script("bench_grouped_gemm.py", "--dtype", "bf16", "--models", *models)),
        Step("layer-vs-transformers-bf16",
             script("bench_transformers.py", "--dtype", "bf16", "--eager-repeats", "0", "--shape", *blocks)),
        Step("train-small", python("-m", "moe_kernels.train", *train_args(out, dry_run))),
        # One GPU: a one-rank group, but every CUDA path of the started exchanges and streams.
        Step("dispatch-overlap-bf16", script("bench_dispatch.py", "--ranks", "1", "--dtype", "bf16")),
    ]  # fmt: skip
    if not quick:
        fp32 = script("bench_ops.py", "--dtype", "fp32", "--shape", "qwen3-moe")
        steps.insert(1, Step("ops-fp32", fp32))
    return Stage("benchmarks", budget("benchmarks", dry_run, quick), steps)


def train_args(out: Path, dry_run: bool) -> list[str]:
    """The small preset for tokens/s: byte tokens (no tokenizer to train first), few steps. The
    dry run trains a micro model for 3 steps."""
    micro = ["--preset", "tiny", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
             "--num-experts", "8", "--topk", "2", "--expert-ffn-hidden-size", "16",
             "--seq-len", "16", "--steps", "3"]  # fmt: skip
    shape = micro if dry_run else ["--preset", "small", "--steps", "40"]
    return [*shape, "--device", "cpu" if dry_run else "cuda", "--tokenizer", "bytes",
            "--balancing", "loss_free", "--eval-every", "1000", "--eval-tokens", "4096",
            "--no-progress", "--out", str(out / "train-small")]  # fmt: skip


def study_stage(out: Path, dry_run: bool, quick: bool) -> Stage:
    """The balance study's GPU preset (its quick preset on the CPU in a dry run)."""
    preset = ["--preset", "quick", "--device", "cpu", "--jobs", "2"] if dry_run else [
              "--preset", "gpu", "--device", "cuda"]  # fmt: skip
    command = python(
        "-m", "moe_kernels.study", *preset, "--no-progress", "--out", str(out / "study")
    )
    return Stage("study", budget("study", dry_run, quick), [Step("study", command)])


def run_stage(stage: Stage, out: Path) -> None:
    deadline = time.monotonic() + stage.budget_s
    for step in stage.steps:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        log = out / f"{stage.name}-{step.name}.log"
        print(f"[{stage.name}] {step.name}: {' '.join(step.command)}", flush=True)
        begin = time.monotonic()
        with log.open("w") as sink:
            try:
                done = subprocess.run(step.command, cwd=ROOT, env=step_env(step), stdout=sink,
                                      stderr=subprocess.STDOUT, timeout=left)  # fmt: skip
                step.status = "passed" if done.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                step.status = "timed out"
            except OSError as error:  # the tool itself is missing
                sink.write(f"{error}\n")
                step.status = "failed"
        step.seconds = time.monotonic() - begin
        print(f"[{stage.name}] {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
        if step.status != "passed":
            print(tail(log), flush=True)


def step_env(step: Step) -> dict[str, str]:
    # The package runs from the source tree (built in place), as pytest and the scripts see it.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"} | step.env


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join("    " + line for line in log.read_text().splitlines()[-lines:])


def last_line(log: Path, pattern: str) -> str:
    """The last line of a log matching ``pattern`` (a pytest total, a tokens/s line)."""
    if not log.is_file():
        return ""
    found = [line.strip() for line in log.read_text().splitlines() if re.search(pattern, line)]
    return found[-1] if found else ""


def summarize(stages: list[Stage], out: Path, header: dict[str, object]) -> str:
    lines = ["# make gpu-check", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| stage | step | status | seconds | note |", "|---|---|---|---|---|"]
    notes = {
        "tests": r"passed|failed|skipped|error|no tests",
        "coverage": r"kernels launched|never launched",
        "train-small": r"tokens/s",
        "study": r"report:|Error",
    }
    for stage in stages:
        for step in stage.steps:
            pattern = notes.get(step.name) or notes.get(stage.name) or r"ERROR SUMMARY|Error"
            note = last_line(out / f"{stage.name}-{step.name}.log", pattern).replace("|", "/")
            lines.append(f"| {stage.name} | {step.name} | {step.status} | {step.seconds:.0f} | "
                         f"{note[:110]} |")  # fmt: skip
    lines += ["", "Stages: " + ", ".join(f"{stage.name} {stage.status}" for stage in stages)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and tools: < 4 min")
    parser.add_argument("--dry-run", action="store_true", help="walk every stage on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--stages", nargs="+", choices=(*DEFAULT_STAGES, "study"), default=list(DEFAULT_STAGES),
        help="the stages to run, in this order (default: all but study)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA GPU (or --dry-run, which walks every stage on the CPU)")
    device = "cpu-dry-run" if args.dry_run else device_slug()
    out = (args.out or BENCHMARKS / "results" / "gpu" / device).resolve()
    out.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {
        "device": "none (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "arch": "-" if args.dry_run else gpu_arch(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "python": sys.version.split()[0],
        "mode": "dry run" if args.dry_run else "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    make = {
        "build": lambda: build_stage(args.dry_run, args.quick),
        "tests": lambda: test_stage(args.dry_run, args.quick),
        "sanitizer": lambda: sanitizer_stage(args.dry_run, args.quick),
        "benchmarks": lambda: benchmark_stage(out, args.dry_run, args.quick),
        "study": lambda: study_stage(out, args.dry_run, args.quick),
    }
    stages = [make[name]() for name in args.stages]
    begin = time.monotonic()
    for stage in stages:
        run_stage(stage, out)
        if stage.name == "build" and (ROOT / "build" / "summary.txt").is_file():
            shutil.copy(ROOT / "build" / "summary.txt", out / "build-summary.txt")
    header["total_s"] = round(time.monotonic() - begin)
    summary = summarize(stages, out, header)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps(
        {**header, "stages": [dataclasses.asdict(stage) | {"status": stage.status}
                              for stage in stages]}, indent=2) + "\n")  # fmt: skip
    print(summary)
    print(f"results: {out}")
    sys.exit(0 if all(stage.status == "passed" for stage in stages) else 1)


if __name__ == "__main__":
    main()
