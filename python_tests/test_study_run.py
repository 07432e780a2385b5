"""The study end to end on its quick preset: every run trained, measured and reported, each
number of the report read from the results and each verdict following its rule from the runs'
own numbers; expert-parallel ranks see the one-process computation batches; a second run
reuses everything; an interrupted run resumes to the same result."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from moe_kernels.study.__main__ import main
from moe_kernels.study.findings import findings, interval_text, number
from moe_kernels.study.run import STUDY_PRESETS, run_arm
from moe_kernels.study.stats import Interval, mean_interval, verdict
from moe_kernels.study.strategies import strategies

PRESET = STUDY_PRESETS["quick"]


def table_rows(report: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with ``header``, by first cell."""
    section = report[report.index(header) :].split("\n\n")[0].splitlines()[2:]
    return {
        cells[0]: cells[1:] for cells in (re.split(r"\s*\|\s*", row.strip("| ")) for row in section)
    }


def numbers_in(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers_in(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers_in(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_quick_study_reports_every_run_and_follows_its_rules(tmp_path):
    out = tmp_path / "study"
    assert main(["--quick", "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "python -m moe_kernels.study --preset quick" in report
    for plot in ("frontier.png", "maxvio_by_computation_batch.png", "loss.png", "maxvio.png",
                 "expert_frequency_by_domain.png"):  # fmt: skip
        assert f"]({plot})" in report and (out / plot).read_bytes()[:4] == b"\x89PNG"
    study = json.loads((out / "results.json").read_text())
    arms = strategies(PRESET.train, PRESET.seeds, PRESET.bias_warmup_steps)
    assert {arm: list(map(int, runs)) for arm, runs in study["runs"].items()} == {
        arm: list(spec.seeds) for arm, spec in arms.items()
    }
    assert len(study["domains"]) == PRESET.domains

    # Every number was computed: finite, except the interval of a single seed.
    for arm, runs in study["runs"].items():
        for seed, run in runs.items():
            folder = out / "runs" / arm / f"seed{seed}"
            assert run["summary"] == json.loads((folder / "summary.json").read_text())
            assert run["measures"] == json.loads((folder / "measures.json").read_text())
            assert all(math.isfinite(x) for x in numbers_in(run)), (arm, seed)
    assert all(math.isfinite(x) for x in numbers_in(study["balanced_router"]))

    # The arms table: each cell the mean over seeds (and its interval) of the JSON's numbers.
    main_table = table_rows(report, "| arm | seeds | perplexity")
    assert list(main_table) == list(arms)
    for arm, runs in study["runs"].items():
        perplexity = [run["measures"]["perplexity"] for run in runs.values()]
        expected = (
            interval_text(mean_interval(perplexity).to_dict())
            if len(perplexity) > 1
            else number(perplexity[0])
        )
        assert main_table[arm][:2] == [str(len(runs)), expected]

    # Each finding states its criterion before its numbers, and each verdict is its rule
    # applied to an interval recomputed here from the runs.
    assert [f["number"] for f in study["findings"]] == [1, 2, 3, 4]
    assert json.dumps(study["findings"]) == json.dumps(findings(study))  # NaN: the sd of 1 seed
    for finding in study["findings"]:
        header = f"### {finding['number']}. "
        section = report[report.index(header) :].split("\n### ")[0]
        assert section.index("**Criterion.**") < section.index("**Verdict:")
        assert f"**Verdict: {finding['verdict']}.**" in section
        for part in finding["parts"]:
            assert part["verdict"] == verdict(Interval(**part["interval"]), part["paper_effect"])
            assert f"| {part['name']} |" in section
    table_2 = {p["name"]: p for p in study["findings"][0]["parts"]}
    balance = table_2["balance at the paper's alpha"]["interval"]
    aux, loss_free = (
        [run["measures"]["maxvio_global"] for run in study["runs"][arm].values()]
        for arm in ("aux_loss_1e-3", "loss_free_1e-2")
    )
    assert balance["mean"] == sum(a - b for a, b in zip(aux, loss_free, strict=True)) / len(aux)

    # MaxVio of computation batches: every size to the plateau, which is MaxVio_global.
    sizes = [str(s) for s in PRESET.curve_sizes]
    curve_table = table_rows(report, "| arm | 1 |")
    for arm, runs in study["runs"].items():
        if arm == "expert_choice":
            continue
        for run in runs.values():
            curve = run["measures"]["computation_batch"]
            assert list(curve) == sizes
            assert curve[sizes[-1]]["mean"] == run["measures"]["maxvio_global"]
            assert all(curve[s]["low"] <= curve[s]["mean"] <= curve[s]["high"] for s in sizes)
        assert len(curve_table[arm]) == len(sizes)

    # Expert parallelism: the first seed of the Table-2 pair on 2 and 4 ranks, each rank
    # routing 1 and 2 windows per forward, receives exactly the one-process loads.
    assert list(study["expert_parallel"]) == [str(r) for r in PRESET.expert_parallel_ranks]
    for ranks, by_arm in study["expert_parallel"].items():
        assert list(by_arm) == ["aux_loss_1e-3", "loss_free_1e-2"]
        for arm, by_size in by_arm.items():
            assert list(by_size) == [str(int(ranks) * m) for m in (1, 2)]
            one_process = study["runs"][arm]["0"]["measures"]["consecutive_batches"]
            assert all(value == one_process[size] for size, value in by_size.items())
    leak = study["findings"][2]
    assert leak["verdict"] == "agrees"  # exact at any scale

    # A second run trains and measures nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")}
    assert main(["--quick", "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")} == stamps

    # A run interrupted after its last checkpoint, before its summary, resumes from it to the
    # same result.
    folder = out / "runs" / "loss_free_1e-2" / "seed1"
    for name in ("summary.json", "measures.json"):
        (folder / name).unlink()
    assert main(["--quick", "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    resumed = json.loads((folder / "measures.json").read_text())
    assert resumed == study["runs"]["loss_free_1e-2"]["1"]["measures"]


def test_every_preset_is_a_study_the_code_can_run():
    for name, preset in STUDY_PRESETS.items():
        arms = strategies(preset.train, preset.seeds, preset.bias_warmup_steps)
        assert len(arms["loss_free_1e-2"].seeds) >= 2, name
        sizes = preset.curve_sizes
        assert sizes[-1] == preset.balance_windows > preset.largest_batch == sizes[-2], name
        assert set(preset.large_batches) <= set(sizes), name
        assert preset.expert_parallel_windows <= preset.balance_windows, name
        assert preset.bias_warmup_steps < preset.train.steps, name


def test_a_finished_run_of_another_configuration_is_refused(tmp_path):
    config = PRESET.train
    folder = tmp_path / "aux_loss_1e-3" / "seed0"
    folder.mkdir(parents=True)
    summary = {"config": dataclasses.replace(config, aux_coeff=0.5).to_dict()}
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="another configuration"):
        run_arm(config, folder, "cpu", progress=False, label="aux_loss_1e-3 seed 0")
    assert run_arm(dataclasses.replace(config, aux_coeff=0.5), folder, "cpu", False, "x") == (
        json.loads(json.dumps(summary))
    )
