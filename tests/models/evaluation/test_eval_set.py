"""Loading, validating and subsetting the eval set, from files written here (and the bundled one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.evaluation.eval_set import DEFAULT_EVAL_SET, EvalSetError, choose_subset, load_eval_set

SYSTEM = {"role": "system", "content": "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."}


def item(item_id: str, topic: str = "return_policy", **changes: object) -> dict:
    data = {
        "id": item_id,
        "topic": topic,
        "messages": [SYSTEM, {"role": "user", "content": f"Câu hỏi {item_id}?"}],
        "facts": [["30 ngày", "ba mươi ngày"]],
        "fact_ids": ["return_window"],
        "reference": "Dạ, bạn được đổi trả trong 30 ngày ạ.",
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


def write(tmp_path: Path, *rows: dict | str) -> Path:
    path = tmp_path / "eval.jsonl"
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_bundled_set_loads_with_every_topic() -> None:
    items = load_eval_set(DEFAULT_EVAL_SET)
    assert len(items) == 130 and len({entry.topic for entry in items}) == 13
    assert all(len(entry.facts) == len(entry.fact_ids) >= 1 for entry in items)
    assert items[0].question == items[0].messages[-1]["content"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        (item("b", facts=[]), "item b): no facts"),
        (item("b", facts=None), "item b): no facts"),
        (item("b", facts=[["30 ngày", "  "]]), "facts[0] has an empty alternative"),
        (item("b", facts=[[]]), "facts[0] must be a non-empty list"),
        (item("b", reference=None), "no reference answer"),
        (item("b", reference=" "), "no reference answer"),
        (item("b", fact_ids=["x", "y"]), '"fact_ids" must be 1 string(s)'),
        (item("b", messages=[SYSTEM]), "the last message must be the user's question"),
        (item("a"), "id 'a' is already used on line 1"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_bad_item_names_the_line_and_the_fix(tmp_path: Path, row: dict | str, message: str) -> None:
    path = write(tmp_path, item("a"), row)
    with pytest.raises(EvalSetError, match="line 2") as caught:
        load_eval_set(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_or_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="does not exist"):
        load_eval_set(tmp_path / "nowhere.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match="has no items"):
        load_eval_set(tmp_path / "blank.jsonl")


def test_fact_ids_default_to_the_first_alternative(tmp_path: Path) -> None:
    [loaded] = load_eval_set(write(tmp_path, item("a", fact_ids=None)))
    assert loaded.fact_ids == ("30 ngày",)


def test_the_subset_goes_round_robin_over_topics_in_file_order(tmp_path: Path) -> None:
    rows = [item("r1", "returns"), item("r2", "returns"), item("r3", "returns"), item("s1", "shipping")]
    rows += [item("w1", "warranty"), item("s2", "shipping")]
    items = load_eval_set(write(tmp_path, *rows))
    assert [entry.id for entry in choose_subset(items, 4)] == ["r1", "s1", "w1", "r2"]
    assert [entry.id for entry in choose_subset(items, 5)] == ["r1", "s1", "w1", "r2", "s2"]
    assert [entry.id for entry in choose_subset(items, 6)] == [row["id"] for row in rows]
    assert choose_subset(items, None) == items == choose_subset(items, 100)


def test_the_bundled_subset_takes_one_item_per_topic_first() -> None:
    items = load_eval_set(DEFAULT_EVAL_SET)
    chosen = choose_subset(items, 13)
    assert len({entry.topic for entry in chosen}) == 13
    assert [entry.id for entry in chosen[:2]] == ["order_tracking-01", "delivery_time-01"]
