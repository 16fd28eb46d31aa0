"""A blind pairwise judge: is the target's answer better than the reference answer?

The judge (any OpenAI-compatible chat model) sees the customer's question and two answers
labelled only "A" and "B": no target names, nothing saying which is the reference. Each item
is asked twice, the target first (target = A) and the reference first (target = B), so a judge
that favours a position cancels out:

- **win**: the target is preferred in both orders;
- **loss**: the reference is preferred in both orders;
- **tie**: anything else with two valid verdicts (one each way, a tie in either order);
- **invalid**: a verdict in either order could not be read (or the request failed). Invalid
  items are reported, not counted as ties, and left out of the judged items.

The verdict is asked for as JSON, `{"verdict": "A" | "B" | "tie"}`, through `response_format`
with a JSON schema (OpenAI and vLLM both support it); a judge that refuses `response_format`
(HTTP 400) is asked again without it. A plain reply "A", "B" or "tie" is accepted too.

Quality vs reference = (wins + ties / 2) / judged ÷ 0.5 − 1: 0 % means as good as the reference,
−100 % loses every item, +100 % wins every item (the article claims "quality −7 %"). The win
rate used by `--min-win-rate` is (wins + ties / 2) / judged, so 0.5 is parity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from models.distill.teacher import TeacherClient, TeacherError, TeacherRejectedError
from models.evaluation.answering import client_error_text

Verdict = Literal["A", "B", "tie"]
_VERDICT_WORDS: dict[str, Verdict] = {"a": "A", "b": "B", "tie": "tie"}
Preference = Literal["target", "reference", "tie"]
Outcome = Literal["win", "tie", "loss", "invalid"]
ORDERS = ("target_first", "reference_first")  # target = A, then target = B
DEFAULT_JUDGE_MAX_TOKENS = 64  # {"verdict": "tie"} is about 8 tokens; room for a model that adds whitespace
REPLY_SHOWN_CHARS = 200

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
            "required": ["verdict"],
            "additionalProperties": False,
        },
    },
}

JUDGE_SYSTEM = (
    "You judge answers of a Vietnamese e-commerce shop's customer-service assistant. You get a customer's "
    "question and two answers, A and B. Decide which answer serves the customer better: correct and complete "
    "facts about the shop's policies, directly answering the question, polite, in Vietnamese. Ignore length "
    "and the order of the answers. Reply with JSON only: "
    '{"verdict": "A"} if A is better, {"verdict": "B"} if B is better, {"verdict": "tie"} if they are equally good.'
)
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The blind prompt: the question and two answers, nothing else."""
    user = f"Question:\n{question}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> Verdict | None:
    """ "A", "B" or "tie" from `{"verdict": ...}` or a plain reply (quotes, a final period and a
    code fence are tolerated, case ignored); None when it is anything else."""
    text = reply.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        payload = json.loads(text)
    except ValueError:
        payload = text
    if isinstance(payload, dict):
        payload = payload.get("verdict")
    if not isinstance(payload, str):
        return None
    word = payload.strip().strip("\"'").rstrip(".").strip().casefold()
    return _VERDICT_WORDS.get(word)


def preference(order: str, verdict: Verdict | None) -> Preference | None:
    """Which side a verdict prefers, given the order the answers were shown in."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    target_label = "A" if order == ORDERS[0] else "B"
    return "target" if verdict == target_label else "reference"


def combine(first: Preference | None, second: Preference | None) -> Outcome:
    """The item's outcome from its two orders' preferences (see the module docstring)."""
    if first is None or second is None:
        return "invalid"
    if first == second == "target":
        return "win"
    if first == second == "reference":
        return "loss"
    return "tie"


@dataclass(frozen=True)
class JudgeTally:
    """Outcomes over a target's items."""

    wins: int
    ties: int
    losses: int
    invalid: int

    @staticmethod
    def of(outcomes: Iterable[Outcome]) -> JudgeTally:
        listed = list(outcomes)
        return JudgeTally(*(listed.count(name) for name in ("win", "tie", "loss", "invalid")))

    @property
    def judged(self) -> int:
        """Items with two valid verdicts."""
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        """(wins + ties / 2) / judged: 0.5 is parity with the reference; None when nothing was judged."""
        return (self.wins + self.ties / 2) / self.judged if self.judged else None

    @property
    def quality_vs_reference(self) -> float | None:
        """win rate ÷ 0.5 − 1, in percent: 0 % = as good as the reference."""
        rate = self.win_rate
        return None if rate is None else (rate / 0.5 - 1) * 100


@dataclass(frozen=True)
class OrderVerdict:
    """One order's request: the judge's reply (shortened), its verdict, the side it prefers."""

    order: str
    reply: str
    verdict: Verdict | None
    prefers: Preference | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "reply": self.reply,
            "verdict": self.verdict,
            "prefers": self.prefers,
            "error": self.error,
        }


@dataclass(frozen=True)
class ItemJudgement:
    orders: tuple[OrderVerdict, OrderVerdict]

    @property
    def outcome(self) -> Outcome:
        return combine(self.orders[0].prefers, self.orders[1].prefers)

    def as_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "orders": [order.as_json() for order in self.orders]}


class Judge:
    """Asks one judge model, through two clients of the same server: `structured` sends
    `response_format` (`VERDICT_SCHEMA` in its config's extra body), `plain` does not and is
    used from the first HTTP 400 of the structured one on."""

    def __init__(self, structured: TeacherClient, plain: TeacherClient, max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS):
        self.clients = {True: structured, False: plain}
        self.structured = True
        self.max_tokens = max_tokens

    async def judge(self, question: str, answer: str, reference: str) -> ItemJudgement:
        """Both orders for one item (asked one after the other)."""
        first = await self._ask(ORDERS[0], question, answer, reference)
        second = await self._ask(ORDERS[1], question, reference, answer)
        return ItemJudgement((first, second))

    async def _ask(self, order: str, question: str, answer_a: str, answer_b: str) -> OrderVerdict:
        messages = judge_messages(question, answer_a, answer_b)
        try:
            reply = await self._chat(messages)
        except TeacherRejectedError as error:
            if error.fatal:
                raise
            return OrderVerdict(order, "", None, None, client_error_text(error))
        except TeacherError as error:
            return OrderVerdict(order, "", None, None, client_error_text(error))
        verdict = parse_verdict(reply)
        return OrderVerdict(order, reply[:REPLY_SHOWN_CHARS], verdict, preference(order, verdict))

    async def _chat(self, messages: Sequence[dict[str, str]]) -> str:
        if self.structured:
            try:
                return await self._send(True, messages)
            except TeacherRejectedError as error:
                if error.status != 400:
                    raise
                self.structured = False  # the server does not take response_format: plain replies from now on
        return await self._send(False, messages)

    async def _send(self, structured: bool, messages: Sequence[dict[str, str]]) -> str:
        reply = await self.clients[structured].chat(messages, max_tokens=self.max_tokens, temperature=0.0)
        return reply.content.strip()
