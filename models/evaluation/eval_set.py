"""Load and check the held-out eval set, and pick a deterministic subset of it.

The format is the one `models/data/build_dataset.py` writes (`models/data/README.md`): one JSON
object per line, `{"id", "topic", "messages": [system, user], "facts": [[alternatives of fact 1],
...], "fact_ids": [...], "reference": "..."}`. Every item needs at least one fact, every fact at
least one non-empty alternative, and a non-empty reference: an item that cannot be scored is a
mistake in the file, so it stops the run (`EvalSetError`, one line saying what to fix) instead
of being skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.evaluation.errors import EvalError

DEFAULT_EVAL_SET = Path(__file__).resolve().parents[1] / "data" / "eval_set.jsonl"
ROLES = frozenset({"system", "user", "assistant"})


class EvalSetError(EvalError):
    """The eval set cannot be used; the message (one line) names the file, the line and the fix."""


@dataclass(frozen=True)
class EvalItem:
    """One question: the chat to send, the facts a correct answer states, a reference answer.

    `facts[i]` holds the alternatives of fact i (any one suffices); `fact_ids[i]` is its name.
    """

    id: str
    topic: str
    messages: tuple[dict[str, str], ...]
    facts: tuple[tuple[str, ...], ...]
    fact_ids: tuple[str, ...]
    reference: str

    @property
    def question(self) -> str:
        """The last user turn: what the customer asked."""
        return next(message["content"] for message in reversed(self.messages) if message["role"] == "user")


def load_eval_set(path: Path) -> list[EvalItem]:
    """Every item of `path`, in file order; `EvalSetError` on the first problem found."""
    path = Path(path)
    if not path.is_file():
        raise EvalSetError(f"eval set {path} does not exist (or is not a file): pass --eval-set FILE.jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvalSetError(f"eval set {path} cannot be read as UTF-8 text: {error}") from None
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"eval set {path}, line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalSetError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        item = parse_item(data, where)
        if item.id in seen:
            raise EvalSetError(f"{where}: id {item.id!r} is already used on line {seen[item.id]}: ids must be unique")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise EvalSetError(f"eval set {path} has no items: it needs one JSON object per line")
    return items


def parse_item(data: Any, where: str) -> EvalItem:
    """One line's object as an `EvalItem`; `EvalSetError` saying which field to fix."""
    if not isinstance(data, dict):
        raise EvalSetError(f"{where}: expected a JSON object, got {type(data).__name__}")
    item_id = data.get("id")
    if not isinstance(item_id, str) or not item_id.strip():
        raise EvalSetError(f'{where}: "id" must be a non-empty string')
    where = f"{where} (item {item_id})"
    topic = data.get("topic")
    if not isinstance(topic, str) or not topic.strip():
        raise EvalSetError(f'{where}: "topic" must be a non-empty string')
    messages = _messages(data.get("messages"), where)
    facts = _facts(data.get("facts"), where)
    fact_ids = data.get("fact_ids")
    if fact_ids is None:
        fact_ids = [alternatives[0] for alternatives in facts]
    if not isinstance(fact_ids, list) or len(fact_ids) != len(facts) or not all(isinstance(f, str) for f in fact_ids):
        raise EvalSetError(f'{where}: "fact_ids" must be {len(facts)} string(s), one per fact (or left out)')
    reference = data.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise EvalSetError(f'{where}: no reference answer: "reference" must be a non-empty string')
    return EvalItem(item_id, topic, messages, facts, tuple(fact_ids), reference)


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise EvalSetError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    messages = []
    for index, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise EvalSetError(f"{where}: messages[{index}] must have a role in {sorted(ROLES)} and a string content")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise EvalSetError(f"{where}: the last message must be the user's question")
    return tuple(messages)


def _facts(value: Any, where: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise EvalSetError(f'{where}: no facts: "facts" must list at least one fact (a list of alternatives)')
    facts = []
    for index, alternatives in enumerate(value):
        if not isinstance(alternatives, list) or not alternatives:
            raise EvalSetError(f"{where}: facts[{index}] must be a non-empty list of alternative strings")
        if not all(isinstance(alternative, str) and alternative.strip() for alternative in alternatives):
            raise EvalSetError(f"{where}: facts[{index}] has an empty alternative: every alternative needs text")
        facts.append(tuple(alternatives))
    return tuple(facts)


def topics_in_order(items: Sequence[EvalItem]) -> list[str]:
    """The topics in the order they first appear in the file."""
    return list(dict.fromkeys(item.topic for item in items))


def choose_subset(items: Sequence[EvalItem], limit: int | None) -> list[EvalItem]:
    """`limit` items spread over the topics: round-robin over the topics (file order), taking
    each topic's items in file order. Deterministic, so quick runs are comparable. None: all."""
    if limit is None or limit >= len(items):
        return list(items)
    queues = {topic: [item for item in items if item.topic == topic] for topic in topics_in_order(items)}
    chosen: list[EvalItem] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues.values():
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return chosen
