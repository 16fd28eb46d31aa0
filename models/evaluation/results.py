"""One target's scored answers and the figures the report gives for it (report.json's `targets`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.evaluation.answering import Answer, Target
from models.evaluation.cost import EnergyCost, TokenCost
from models.evaluation.eval_set import EvalItem
from models.evaluation.judging import ItemJudgement, JudgeTally
from models.evaluation.scoring import (
    VIETNAMESE,
    FactMatch,
    corpus_chrf,
    exact_answer_rate,
    fact_recall,
    is_empty,
    is_refusal,
    language,
    match_facts,
    sentence_chrf,
    share,
)
from server.telemetry.stats import percentiles


@dataclass(frozen=True)
class ScoredAnswer:
    """An answer with everything scored about it (a failed request scores as an empty answer)."""

    item: EvalItem
    answer: Answer
    facts: FactMatch
    chrf: float
    language: str | None
    empty: bool
    refusal: bool
    judgement: ItemJudgement | None = None

    @property
    def vietnamese(self) -> bool:
        return self.language == VIETNAMESE

    def row(self, target: Target) -> dict[str, Any]:
        """The answers.jsonl line (latency ms, tokens from the response's usage)."""
        answer = self.answer
        return {
            "target": target.label,
            "model": target.model,
            "id": self.item.id,
            "topic": self.item.topic,
            "question": self.item.question,
            "answer": answer.text,
            "error": answer.error,
            "facts_stated": list(self.facts.stated),
            "facts_missing": list(self.facts.missing),
            "exact": self.facts.exact,
            "chrf": self.chrf,
            "language": self.language,
            "vietnamese": self.vietnamese,
            "empty": self.empty,
            "refusal": self.refusal,
            "latency_ms": answer.latency_ms,
            "attempts": answer.attempts,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "finish_reason": answer.finish_reason,
            "judge": None if self.judgement is None else self.judgement.as_json(),
        }


def score_answer(item: EvalItem, answer: Answer) -> ScoredAnswer:
    text = answer.text
    return ScoredAnswer(
        item=item,
        answer=answer,
        facts=match_facts(text, item),
        chrf=sentence_chrf(text, item.reference),
        language=language(text),
        empty=is_empty(text),
        refusal=is_refusal(text),
    )


@dataclass
class TargetRun:
    """A target's run: its answers in item order, what they cost, when it ran (unix seconds)."""

    target: Target
    scored: list[ScoredAnswer]
    energy: EnergyCost
    token_cost: TokenCost | None
    started_at: float
    finished_at: float
    sent_requests: int  # chat requests sent, retries included
    judge: JudgeTally | None = field(default=None)

    def summary(self, topics: Sequence[str]) -> dict[str, Any]:
        """Every figure of this target (units in the names: ms, tokens, J, USD)."""
        scored = self.scored
        matches = [entry.facts for entry in scored]
        answers = [entry.answer for entry in scored]
        with_usage = [answer for answer in answers if answer.prompt_tokens is not None]
        prompt = sum(answer.prompt_tokens or 0 for answer in with_usage)
        completion = sum(answer.completion_tokens or 0 for answer in with_usage)
        return {
            "label": self.target.label,
            "url": self.target.url,
            "model": self.target.model,
            "answers": len(scored),
            "errors": sum(answer.error is not None for answer in answers),
            "retried": sum(answer.error is None and answer.attempts > 1 for answer in answers),
            "wall_s": self.finished_at - self.started_at,
            "facts_required": sum(match.required for match in matches),
            "facts_stated": sum(len(match.stated) for match in matches),
            "fact_recall": fact_recall(matches),
            "exact_answers": sum(match.exact for match in matches),
            "exact_answer_rate": exact_answer_rate(matches),
            "chrf": corpus_chrf([answer.text for answer in answers], [entry.item.reference for entry in scored]),
            "empty_share": share([entry.empty for entry in scored]),
            "refusal_share": share([entry.refusal for entry in scored]),
            "not_vietnamese_share": share([not entry.empty and not entry.vietnamese for entry in scored]),
            "vietnamese_share": share([entry.vietnamese for entry in scored]),
            "latency_ms": percentiles(answer.latency_ms for answer in answers if answer.first_attempt),
            "tokens": {
                "prompt": prompt,
                "completion": completion,
                "prompt_per_answer": prompt / len(with_usage) if with_usage else None,
                "completion_per_answer": completion / len(with_usage) if with_usage else None,
                "answers_without_usage": len(answers) - len(with_usage),
            },
            "by_topic": {topic: _topic_figures([e for e in scored if e.item.topic == topic]) for topic in topics},
            "cost": {
                "energy": self.energy.as_json(),
                "energy_summary": self.energy.summary,
                "tokens": None if self.token_cost is None else vars(self.token_cost),
            },
            "judge": None if self.judge is None else _judge_figures(self.judge),
        }


def _topic_figures(scored: Sequence[ScoredAnswer]) -> dict[str, Any]:
    matches = [entry.facts for entry in scored]
    return {
        "items": len(scored),
        "facts_required": sum(match.required for match in matches),
        "facts_stated": sum(len(match.stated) for match in matches),
        "fact_recall": fact_recall(matches),
        "exact_answer_rate": exact_answer_rate(matches),
    }


def _judge_figures(tally: JudgeTally) -> dict[str, Any]:
    return {
        "wins": tally.wins,
        "ties": tally.ties,
        "losses": tally.losses,
        "invalid": tally.invalid,
        "judged": tally.judged,
        "win_rate": tally.win_rate,
        "quality_vs_reference_pct": tally.quality_vs_reference,
    }
