"""The study end to end on its quick preset: every arm trained, measured and reported, each
number of the report read from the runs; a second run reuses them; an interrupted arm resumes."""

from __future__ import annotations

import json
import re

from moe_kernels.study.__main__ import main
from moe_kernels.study.findings import number
from moe_kernels.study.run import COMPUTATION_BATCH_SIZES, STUDY_PRESETS
from moe_kernels.study.strategies import strategies


def table_rows(report: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with ``header``, by first cell."""
    section = report[report.index(header) :].split("\n\n")[0].splitlines()[2:]
    return {
        cells[0]: cells[1:] for cells in (re.split(r"\s*\|\s*", row.strip("| ")) for row in section)
    }


def test_quick_study_reports_every_arm_from_its_runs(tmp_path):
    out = tmp_path / "study"
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "python -m moe_kernels.study --quick" in report
    for plot in ("loss.png", "maxvio.png", "maxvio_by_computation_batch.png"):
        assert f"]({plot})" in report and (out / plot).read_bytes()[:4] == b"\x89PNG"
    arms = list(strategies(STUDY_PRESETS["quick"]))
    results = json.loads((out / "results.json").read_text())["arms"]
    assert list(results) == arms
    main_table = table_rows(report, "| arm | val perplexity")
    by_size = table_rows(report, "| arm | 1 |")
    assert list(main_table) == list(by_size) == arms
    for name in arms:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        measures = json.loads((out / "runs" / name / "measures.json").read_text())
        assert results[name] == {"summary": summary, "measures": measures}
        assert main_table[name] == [
            number(summary["val_perplexity"]),
            number(summary["maxvio_global"]),
            number(summary["maxvio_batch"]),
            number(measures["future_token_leakage"]),
        ]
        sizes = measures["maxvio_by_computation_batch"]
        assert by_size[name] == [number(sizes[str(s)]) for s in COMPUTATION_BATCH_SIZES]
    # Expert choice balances by construction and leaks the future; token choice does not.
    assert results["expert_choice"]["measures"]["future_token_leakage"] > 1e-3
    assert results["loss_free_1e-2"]["measures"]["future_token_leakage"] < 1e-6

    verdicts = [line for line in report.splitlines() if re.match(r"[1-4]\. ", line)]
    assert len(verdicts) == 4
    assert all(re.search(r": (agrees|does not agree)[.:]", line) for line in verdicts)
    leak = results["expert_choice"]["measures"]["future_token_leakage"]
    assert f"moves earlier logits by {number(leak)} of the largest logit" in verdicts[2]

    # A second run trains nothing: every arm's files stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.json")}
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.json")} == stamps

    # An arm interrupted after its last checkpoint, before its summary, resumes from it to the
    # same result.
    arm = out / "runs" / "loss_free_1e-2"
    for name in ("summary.json", "measures.json"):
        (arm / name).unlink()
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    resumed = json.loads((arm / "summary.json").read_text())
    assert resumed["val_loss"] == results["loss_free_1e-2"]["summary"]["val_loss"]
