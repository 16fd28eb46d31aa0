"""Gates on the first target's figures: direction, unknown figures, what the message names."""

from __future__ import annotations

from models.evaluation.gates import check_gates

SUMMARY = {"fact_recall": 0.8, "vietnamese_share": 0.95, "empty_share": 0.05, "judge": {"win_rate": 0.45}}


def test_only_the_given_gates_are_checked_each_in_its_direction() -> None:
    thresholds = {"--min-fact-recall": 0.8, "--min-vietnamese": None, "--max-empty": 0.02, "--min-win-rate": 0.5}
    gates = {gate.spec.flag: gate for gate in check_gates(thresholds, SUMMARY)}
    assert set(gates) == {"--min-fact-recall", "--max-empty", "--min-win-rate"}
    assert gates["--min-fact-recall"].passed  # 0.8 >= 0.8
    assert not gates["--max-empty"].passed and gates["--max-empty"].describe() == (
        "--max-empty: empty share 0.05 > 0.02: FAILED"
    )
    assert gates["--min-win-rate"].describe() == "--min-win-rate: judge win rate 0.45 < 0.5: FAILED"
    assert check_gates({}, SUMMARY) == []


def test_a_figure_that_could_not_be_computed_fails_its_gate() -> None:
    [gate] = check_gates({"--min-win-rate": 0.0}, {**SUMMARY, "judge": {"win_rate": None}})
    assert not gate.passed and "unknown" in gate.describe() and gate.as_json()["value"] is None
    [gate] = check_gates({"--min-fact-recall": 0.5}, {"fact_recall": None})
    assert not gate.passed
