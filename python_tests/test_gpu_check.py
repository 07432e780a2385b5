"""``make gpu-check``'s dry run: every stage of the GPU check walked on the CPU, so the script
that a rare GPU visit depends on cannot rot between visits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import launch_every_kernel  # noqa: E402


def test_the_dry_run_walks_every_stage(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == ["build", "tests", "sanitizer", "benchmarks"]
    for stage in stages.values():
        assert stage["status"] == "passed", stage
        for step in stage["steps"]:
            assert (tmp_path / f"{stage['name']}-{step['name']}.log").is_file()
    assert [step["name"] for step in stages["sanitizer"]["steps"]] == [
        "coverage", "memcheck", "racecheck", "synccheck", "initcheck"
    ]  # fmt: skip
    declared = len(launch_every_kernel.declared_kernels())
    coverage = (tmp_path / "sanitizer-coverage.log").read_text()
    assert f"{declared} of {declared} kernels launched" in coverage
    assert " passed" in (tmp_path / "tests-tests.log").read_text()
    assert (tmp_path / "build-summary.txt").is_file()
    assert list(tmp_path.glob("bench_grouped_gemm_*.json")), "the benchmarks' results"
    assert (tmp_path / "train-small" / "loss_free" / "summary.json").is_file()
    assert "| benchmarks | train-small | passed |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_the_study_stage_runs_the_quick_preset_in_a_dry_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--stages",
         "study", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["study"]
    assert json.loads((tmp_path / "study" / "results.json").read_text())["preset"] == "quick"
    assert "| study | study | passed |" in (tmp_path / "summary.md").read_text()


def test_every_declared_kernel_is_found():
    """The coverage check parses csrc/ for kernels: it must find each family's, with and
    without __launch_bounds__, or a kernel could escape the sanitizers unnoticed."""
    declared = launch_every_kernel.declared_kernels()
    for kernel in ["biased_topk_kernel", "biased_topk_backward_kernel", "expert_histogram_kernel",
                   "update_bias_kernel", "gather_rows_kernel", "unpermute_kernel",
                   "tensor_core_gemm_kernel", "wgmma_gemm_kernel", "simt_gemm_kernel",
                   "tile_schedule_kernel", "swiglu_backward_kernel",
                   "transpose_segments_kernel"]:  # fmt: skip
        assert kernel in declared
    assert len(declared) >= 18


@pytest.mark.parametrize(
    "names,found",
    [
        (["void moe_kernels::routing::(anonymous namespace)::biased_topk_kernel<float, 1>(...)"],
         {"biased_topk_kernel"}),
        (["moe_kernels::routing::emu::biased_topk_backward_kernel<c10::BFloat16, 16>"],
         {"biased_topk_backward_kernel"}),
        (["void at::native::vectorized_elementwise_kernel<4>(...)"], set()),
    ],
)  # fmt: skip
def test_launched_kernels_are_matched_by_whole_name(names, found):
    declared = {"biased_topk_kernel", "biased_topk_backward_kernel", "unpermute_kernel"}
    assert launch_every_kernel.launched(names, declared) == found
