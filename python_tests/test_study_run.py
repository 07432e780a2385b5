"""The study end to end on its quick preset: every arm trained, measured, run on expert-parallel
ranks and reported, each number of the report read from the runs; a second run reuses them; an
interrupted arm resumes. And the held-out text of each domain."""

from __future__ import annotations

import json
import re

from moe_kernels.study.__main__ import main
from moe_kernels.study.findings import mean, number
from moe_kernels.study.run import (
    COMPUTATION_BATCH_SIZES,
    DOMAIN_SEQUENCES,
    EXPERT_PARALLEL_RANKS,
    STUDY_PRESETS,
    held_out_by_domain,
)
from moe_kernels.study.strategies import strategies
from moe_kernels.train.corpus import load_corpus
from moe_kernels.train.documents import default_cache_dir
from moe_kernels.train.tokenizer import get_tokenizer


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
    plots = ("loss.png", "maxvio.png", "maxvio_by_computation_batch.png")
    for plot in (*plots, "expert_frequency_by_domain.png"):
        assert f"]({plot})" in report and (out / plot).read_bytes()[:4] == b"\x89PNG"
    arms = list(strategies(STUDY_PRESETS["quick"]))
    study = json.loads((out / "results.json").read_text())
    results = study["arms"]
    assert list(results) == arms
    assert study["domains"] == list(held_out_by_domain(STUDY_PRESETS["quick"]))
    main_table = table_rows(report, "| arm | val perplexity")
    by_size = table_rows(report, "| arm | 1 |")
    topk_by_layer = table_rows(report, "| arm | layer 1 |")
    assert list(main_table) == list(by_size) == list(topk_by_layer) == arms
    for name in arms:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        measures = json.loads((out / "runs" / name / "measures.json").read_text())
        assert results[name] == {"summary": summary, "measures": measures}
        assert main_table[name] == [
            number(summary["val_perplexity"]),
            number(summary["maxvio_global"]),
            number(summary["maxvio_batch"]),
            number(measures["future_token_leakage"]),
            number(mean(measures["topk_score_sum"])),
            number(measures["domain_specialisation"]),
        ]
        sizes = measures["maxvio_by_computation_batch"]
        assert by_size[name] == [number(sizes[str(s)]) for s in COMPUTATION_BATCH_SIZES]
        assert topk_by_layer[name] == [number(value) for value in measures["topk_score_sum"]]
        assert len(measures["topk_score_sum"]) == STUDY_PRESETS["quick"].model.num_layers
        frequencies = measures["expert_frequency_by_domain"]
        assert list(frequencies) == study["domains"]
        for per_layer in frequencies.values():
            assert all(abs(sum(f) - 1) < 1e-9 for f in per_layer)

    # Real expert parallelism: every token-choice arm on 2 and 4 ranks, each rank routing 1
    # and 2 sequences per forward, receives exactly the loads of the one-process grouping.
    token_choice = [name for name in arms if name != "expert_choice"]
    assert list(study["expert_parallel"]) == [str(r) for r in EXPERT_PARALLEL_RANKS]
    for ranks, by_arm in study["expert_parallel"].items():
        assert list(by_arm) == token_choice
        for name, by_size in by_arm.items():
            assert list(by_size) == [str(int(ranks) * m) for m in (1, 2)]
            for size, value in by_size.items():
                assert value == results[name]["measures"]["maxvio_by_computation_batch"][size]
    rows = [
        [ranks, name, size, number(value), number(value)]
        for ranks, by_arm in study["expert_parallel"].items()
        for name, by_size in by_arm.items()
        for size, value in by_size.items()
    ]
    table = report[report.index("| ranks | arm |") :].split("\n\n")[0].splitlines()[2:]
    assert table == ["| " + " | ".join(row) + " |" for row in rows]
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


def test_held_out_by_domain_is_each_domains_held_out_text():
    config = STUDY_PRESETS["quick"]
    domains = held_out_by_domain(config)
    fewest, most = DOMAIN_SEQUENCES
    assert len(domains) >= 2 and list(domains) == sorted(domains)
    assert all(
        fewest <= len(ids) <= most and ids.shape[1] == config.seq_len for ids in domains.values()
    )
    corpus = load_corpus(config.data)
    tokenizer = get_tokenizer(
        config.tokenizer, corpus, config.model.vocab_size, default_cache_dir()
    )
    for domain, ids in domains.items():
        first = corpus.val[corpus.val_domains.index(domain)]
        expected = [*tokenizer.encode(first), tokenizer.eot_id][: config.seq_len]
        assert ids.flatten()[: len(expected)].tolist() == expected
