"""The judge's verdicts: parsing, both orders combined, invalid ones, the quality figure."""

from __future__ import annotations

import pytest

from models.evaluation.judging import (
    VERDICT_SCHEMA,
    JudgeTally,
    combine,
    judge_messages,
    parse_verdict,
    preference,
)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ('{"verdict": "A"}', "A"),
        ('{"verdict":"b"}', "B"),
        (' {"verdict": "tie"} ', "tie"),
        ("A", "A"),
        ("b.", "B"),
        ('"Tie"', "tie"),
        ('```json\n{"verdict": "B"}\n```', "B"),
        ("", None),
        ("Answer A is better", None),
        ('{"verdict": "C"}', None),
        ('{"winner": "A"}', None),
        ('{"verdict": "A"', None),
        ('["A"]', None),
    ],
)
def test_verdicts_are_read_from_json_or_a_plain_reply(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_the_schema_allows_exactly_the_three_verdicts() -> None:
    schema = VERDICT_SCHEMA["json_schema"]["schema"]
    assert schema["properties"]["verdict"]["enum"] == ["A", "B", "tie"] and schema["required"] == ["verdict"]


def test_the_prompt_is_blind() -> None:
    messages = judge_messages("Đổi trả thế nào?", "câu trả lời một", "câu trả lời hai")
    text = " ".join(message["content"] for message in messages).casefold()
    assert "answer a:\ncâu trả lời một" in text and "answer b:\ncâu trả lời hai" in text
    assert "reference" not in text and "student" not in text and "target" not in text


def test_a_verdict_prefers_a_side_by_the_order_shown() -> None:
    assert preference("target_first", "A") == "target" and preference("target_first", "B") == "reference"
    assert preference("reference_first", "A") == "reference" and preference("reference_first", "B") == "target"
    assert preference("reference_first", "tie") == "tie" and preference("target_first", None) is None


@pytest.mark.parametrize(
    ("first", "second", "outcome"),
    [
        ("target", "target", "win"),
        ("reference", "reference", "loss"),
        ("target", "reference", "tie"),  # position bias: each order prefers whatever came first
        ("reference", "target", "tie"),
        ("tie", "target", "tie"),
        ("tie", "tie", "tie"),
        (None, "target", "invalid"),
        ("reference", None, "invalid"),
    ],
)
def test_both_orders_combine_into_one_outcome(first: str | None, second: str | None, outcome: str) -> None:
    assert combine(first, second) == outcome


def test_a_judge_always_answering_a_gives_ties_only() -> None:
    first, second = preference("target_first", "A"), preference("reference_first", "A")
    assert combine(first, second) == "tie"


def test_the_quality_figure_and_win_rate() -> None:
    tally = JudgeTally.of(["win", "tie", "loss", "loss", "invalid", "tie"])
    assert (tally.wins, tally.ties, tally.losses, tally.invalid, tally.judged) == (1, 2, 2, 1, 5)
    assert tally.win_rate == pytest.approx(0.4)
    assert tally.quality_vs_reference == pytest.approx(-20.0)
    assert JudgeTally.of(["tie"] * 4).quality_vs_reference == 0.0
    assert JudgeTally.of(["win"] * 3).quality_vs_reference == pytest.approx(100.0)
    assert JudgeTally.of(["loss"]).quality_vs_reference == pytest.approx(-100.0)
    nothing = JudgeTally.of(["invalid", "invalid"])
    assert nothing.judged == 0 and nothing.win_rate is None and nothing.quality_vs_reference is None
    # the article's "quality −7 %": 46.5 % of the judged comparisons won (ties as half)
    assert JudgeTally(wins=83, ties=20, losses=97, invalid=0).quality_vs_reference == pytest.approx(-7.0)
