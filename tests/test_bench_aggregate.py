"""The benchmarks' folding of repetitions: medians with their spread, never the best run, and a
ratio to a baseline taken within each repetition."""

from __future__ import annotations

import math

import pytest

from benchmarks.aggregate import fold, fold_figures, fold_notes, fold_table, fold_text
from benchmarks.stats import drain_rate


def test_text_differing_only_in_numbers_is_folded_to_median_and_spread() -> None:
    texts = [
        "192.9 starts/s vs 2,049.5 no-op tasks/s, threads x64",
        "180.2 starts/s vs 1,990.0 no-op tasks/s, threads x64",
        "201.3 starts/s vs 2,100.1 no-op tasks/s, threads x64",
    ]
    assert fold_text(texts) == (
        "192.9 (180.2\u2013201.3) starts/s vs 2,049.5 (1,990.0\u20132,100.1) no-op tasks/s,"
        " threads x64"
    )


def test_text_differing_in_words_is_given_per_repetition() -> None:
    folded = fold_text(["config threads x256", "config 2 x threads x128", "config threads x256"])
    assert folded == (
        "repetitions 1, 3: config threads x256 · repetition 2: config 2 x threads x128"
    )


def test_a_target_is_the_median_of_the_repetitions_not_the_best() -> None:
    runs = [
        {"targets": [{"name": "rate", "value": v, "met": v >= 0.25, "detail": f"{v} x"}]}
        for v in (0.1, 0.3, 0.2)
    ]
    (target,) = fold(runs)["targets"]
    assert target["value"] == 0.2
    assert (target["min"], target["max"]) == (0.1, 0.3)
    assert target["values"] == [0.1, 0.3, 0.2]
    assert target["met_runs"] == 1
    assert target["detail"] == "0.2 (0.1\u20130.3) x"


def test_a_ratio_is_taken_within_each_repetition_before_the_median() -> None:
    figures = [
        [{"name": "f", "value": v, "baseline": b, "baseline_name": "bare"}]
        for v, b in ((100, 200), (120, 200), (90, 100))
    ]
    (figure,) = fold_figures(figures)
    # median(value) / median(baseline) would be 100 / 200 = 0.5; per repetition: .5, .6, .9
    assert figure["ratio"] == pytest.approx(0.6)
    assert figure["ratios"] == pytest.approx([0.5, 0.6, 0.9])
    assert figure["value"] == 100
    assert figure["baseline"] == 200


def test_table_rows_are_matched_by_label_and_a_missing_row_says_so() -> None:
    def table(rows: list[list[object]]) -> dict[str, object]:
        return {"title": "waits", "columns": ["state", "backends"], "rows": rows}

    folded = fold_table(
        [table([["CPU", 0.5], ["Lock", 2.0]]), table([["Lock", 3.0], ["CPU", 0.5]]), table([])]
    )
    assert folded["rows"] == [
        ["CPU (in 2 of 3 repetitions)", 0.5],
        ["Lock (in 2 of 3 repetitions)", "2.5 (2\u20133)"],
    ]


def test_a_note_written_in_some_repetitions_only_is_given_as_written() -> None:
    notes = fold_notes([["ran 1 s", "At 50/s, 5 late"], ["ran 2 s"], ["ran 3 s"]])
    assert notes == ["ran 2 (1\u20133) s", "Repetition 1 of 3: At 50/s, 5 late"]


def test_a_failed_repetition_is_counted_and_the_rest_folded() -> None:
    ok = {"seconds": 1.0, "targets": [{"name": "t", "value": 5, "met": True}]}
    folded = fold([ok, {"seconds": 2.0, "error": "RuntimeError: boom"}, ok])
    assert folded["completed"] == 2
    assert folded["targets"][0]["values"] == [5, 5]
    assert "Repetition 2 failed: RuntimeError: boom" in folded["notes"]
    assert "error" in fold([{"error": "RuntimeError: boom"}])


def test_drain_rate_counts_from_ready_to_the_last_completion() -> None:
    assert drain_rate([11.0, 12.0, 13.0, 14.0], ready_at=10.0) == 1.0
    assert math.isnan(drain_rate([], ready_at=10.0))
    assert math.isnan(drain_rate([1.0], ready_at=None))
