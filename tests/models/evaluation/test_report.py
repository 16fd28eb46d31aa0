"""The report folder from synthetic runs (no server): the bundled references as a perfect target,
a measured gateway, judge verdicts, gates, and what report.md shows of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.evaluation.answering import Answer, Target
from models.evaluation.command import EvalPlan, report_document
from models.evaluation.cost import EnergyCost, not_measured, parse_price, token_cost
from models.evaluation.errors import EvalError
from models.evaluation.eval_set import DEFAULT_EVAL_SET, choose_subset, load_eval_set, topics_in_order
from models.evaluation.judging import ItemJudgement, JudgeTally, OrderVerdict, preference
from models.evaluation.report import check_out, publish_report
from models.evaluation.results import TargetRun, score_answer

ITEMS = choose_subset(load_eval_set(DEFAULT_EVAL_SET), 26)
MEASURED = EnergyCost(
    measured=True, reason=None, gateway_requests=28, other_requests=2, attributed_j=2_800.0, total_j=9_000.0,
    currency="VND", electricity=2.33, electricity_usd=2.33 / 25_000, remote_usd=0.0, j_per_1000_answers=100_000.0,
    kwh_per_1000_answers=100_000.0 / 3_600_000, electricity_per_1000_answers=83.3, usd_per_1000_answers=0.00333,
)  # fmt: skip


def answer(item_id: str, text: str, attempts: int = 1, error: str | None = None) -> Answer:
    latency = None if error else 100.0 * attempts
    return Answer(item_id, text, latency, None if error else 120, None if error else 30, "stop", attempts, error)


def judged(verdicts: tuple[str | None, str | None]) -> ItemJudgement:
    orders = ("target_first", "reference_first")
    return ItemJudgement(
        tuple(OrderVerdict(o, str(v), v, preference(o, v)) for o, v in zip(orders, verdicts, strict=True))
    )


def runs() -> list[TargetRun]:
    """A "student" answering with the references (one failed, one retried), and a "teacher" that says nothing useful."""
    student = [score_answer(item, answer(item.id, item.reference)) for item in ITEMS]
    student[0] = score_answer(ITEMS[0], answer(ITEMS[0].id, "", error="HTTP 503: busy"))
    student[1] = score_answer(ITEMS[1], answer(ITEMS[1].id, ITEMS[1].reference, attempts=2))
    verdicts = [("A", "B"), ("A", "B"), ("B", "A"), ("A", "A"), (None, "A")] * 6
    pairs = zip(student, verdicts, strict=False)  # more verdicts than items: the first ones are used
    student = [entry.__class__(**{**entry.__dict__, "judgement": judged(v)}) for entry, v in pairs]
    teacher = [score_answer(item, answer(item.id, "I cannot help with that.")) for item in ITEMS]
    name, price = parse_price("gpt-4.1")
    return [
        TargetRun(
            Target("student", "http://127.0.0.1:8000/v1", "student"), student, MEASURED, None, 0.0, 10.0, 28,
            JudgeTally.of(entry.judgement.outcome for entry in student if entry.judgement),
        ),
        TargetRun(
            Target("teacher", "https://api.example/v1", "gpt-x", price=price, price_name=name), teacher,
            not_measured("not a student-serve gateway"), token_cost(name, price, 120 * 26, 30 * 26, 26), 0.0, 20.0, 26,
        ),
    ]  # fmt: skip


def plan(out: Path, **thresholds: float) -> EvalPlan:
    return EvalPlan(
        targets=(), items=tuple(ITEMS), items_total=130, eval_set=DEFAULT_EVAL_SET,
        topics=tuple(topics_in_order(ITEMS)), limit=26, max_tokens=160, concurrency=4, out=out,
        judge=Target("judge", "http://judge/v1", "judge-model"), judge_max_tokens=64,
        thresholds={f"--{flag.replace('_', '-')}": value for flag, value in thresholds.items()},
    )  # fmt: skip


def test_a_target_answering_with_the_references_states_every_fact(tmp_path: Path) -> None:
    document, gates = report_document(plan(tmp_path, min_fact_recall=0.9, max_empty=0.01), runs(), "now")
    student, teacher = document["targets"]
    first = ITEMS[0]
    assert student["facts_required"] == sum(len(item.facts) for item in ITEMS)
    assert student["facts_stated"] == student["facts_required"] - len(first.facts)  # the failed answer
    assert student["exact_answer_rate"] == pytest.approx(25 / 26)
    assert student["empty_share"] == pytest.approx(1 / 26) and student["refusal_share"] == 0
    assert student["not_vietnamese_share"] == 0 and student["vietnamese_share"] == pytest.approx(25 / 26)
    assert (student["errors"], student["retried"], student["latency_ms"]["count"]) == (1, 1, 24)
    assert student["chrf"] > 95
    assert teacher["refusal_share"] == 1 and teacher["not_vietnamese_share"] == 1 and teacher["fact_recall"] == 0
    assert teacher["cost"]["tokens"]["usd_per_1000_answers"] == pytest.approx(150 * 8 / 1000)
    assert student["judge"] | {"win_rate": None, "quality_vs_reference_pct": None} == {
        "wins": 11, "ties": 5, "losses": 5, "invalid": 5, "judged": 21, "win_rate": None,
        "quality_vs_reference_pct": None,
    }  # fmt: skip
    assert student["judge"]["quality_vs_reference_pct"] == pytest.approx(((11 + 2.5) / 21 / 0.5 - 1) * 100)
    assert [(gate.spec.flag, gate.passed) for gate in gates] == [("--min-fact-recall", True), ("--max-empty", False)]
    assert document["passed"] is False


def test_the_folder_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "report"
    document, _ = report_document(plan(out, min_win_rate=0.5), runs(), "2025-01-01T00:00:00+00:00")
    rows = [entry.row(run.target) for run in runs() for entry in run.scored]
    publish_report(out, document, rows, document["eval_set"]["topics"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == document
    assert len((out / "answers.jsonl").read_text(encoding="utf-8").splitlines()) == 52

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "|  | student | teacher |" in markdown
    assert (
        "| energy cost per 1,000 answers | 83.3 VND ($0.00333); 0.02778 kWh "
        "| not measured: not a student-serve gateway |" in markdown
    )
    assert "| API price per 1,000 answers | no price given | $1.2 (gpt-4.1) |" in markdown
    assert "| judge: win / tie / loss / invalid | 11 / 5 / 5 / 5 | – |" in markdown
    assert "+28.6 % (win rate 0.643, 21 judged)" in markdown
    assert "judge win rate >= 0.5 (`--min-win-rate`): 0.6429, passed" in markdown
    assert "finished 2 requests from other clients" in markdown and "1 requests failed" in markdown
    with pytest.raises(EvalError, match="already exists"):
        check_out(out)
