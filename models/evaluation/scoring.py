"""Pure scoring of answers: facts stated, recall, exact answers, empty/refusal/language flags, chrF.

Definitions used in every report:

- **A fact is stated** when any of its alternatives occurs in the answer as a substring, both
  compared after Unicode NFC, whitespace runs collapsed to one space, and casefolding
  (`models/data/README.md`). Curly apostrophes count as straight ones.
- **Fact recall**: facts stated / facts required, summed over all items (an item with three facts
  weighs three times an item with one).
- **Exact-answer rate**: the share of items whose every required fact is stated.
- **Empty**: the answer has no letter or digit.
- **Refusal**: the answer contains one of `REFUSAL_PATTERNS` (normalised as above).
- **Not Vietnamese**: a non-empty answer that `py3langid` does not classify as "vi". The
  Vietnamese share counts non-empty answers classified "vi", out of all answers.
- **chrF**: sacrebleu's chrF (character 6-grams, β = 2) against the reference, 0-100; the report
  gives the corpus-level score, answers.jsonl each answer's sentence-level score.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from models.evaluation.eval_set import EvalItem

# Kept short and specific: a customer-service answer saying "shop không thể hủy đơn đã giao" is
# an answer, not a refusal. Written already normalised (casefolded, straight apostrophes).
REFUSAL_PATTERNS = (
    "xin lỗi, tôi không thể",
    "tôi không thể trả lời",
    "tôi không thể giúp",
    "tôi không thể hỗ trợ",
    "là một mô hình ngôn ngữ",
    "là một trợ lý ai",
    "i can't",
    "i cannot",
    "i'm sorry, but",
    "i am unable to",
    "as an ai",
)
VIETNAMESE = "vi"


def normalise(text: str) -> str:
    """NFC, whitespace runs as one space, casefolded, curly apostrophes straight: the matching form."""
    collapsed = " ".join(unicodedata.normalize("NFC", text).split())
    return unicodedata.normalize("NFC", collapsed.casefold()).replace("\u2019", "'").replace("\u2018", "'")


@dataclass(frozen=True)
class FactMatch:
    """Which of an item's facts an answer states, by fact id."""

    stated: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def required(self) -> int:
        return len(self.stated) + len(self.missing)

    @property
    def exact(self) -> bool:
        """Every required fact is stated."""
        return not self.missing


def fact_stated(answer: str, alternatives: Sequence[str]) -> bool:
    """True when any alternative occurs in the answer (both normalised)."""
    text = normalise(answer)
    return any(normalise(alternative) in text for alternative in alternatives)


def match_facts(answer: str, item: EvalItem) -> FactMatch:
    stated: list[str] = []
    missing: list[str] = []
    for fact_id, alternatives in zip(item.fact_ids, item.facts, strict=True):
        (stated if fact_stated(answer, alternatives) else missing).append(fact_id)
    return FactMatch(tuple(stated), tuple(missing))


def fact_recall(matches: Sequence[FactMatch]) -> float | None:
    """Facts stated / facts required over all items (None without items)."""
    required = sum(match.required for match in matches)
    return sum(len(match.stated) for match in matches) / required if required else None


def exact_answer_rate(matches: Sequence[FactMatch]) -> float | None:
    """The share of items whose every fact is stated (None without items)."""
    return sum(match.exact for match in matches) / len(matches) if matches else None


def is_empty(answer: str) -> bool:
    """No letter or digit at all (whitespace, punctuation, emoji only)."""
    return not any(char.isalnum() for char in answer)


def is_refusal(answer: str) -> bool:
    text = normalise(answer)
    return any(pattern in text for pattern in REFUSAL_PATTERNS)


def language(answer: str) -> str | None:
    """py3langid's language code of a non-empty answer; None for an empty one (nothing to classify)."""
    if is_empty(answer):
        return None
    import py3langid  # its model loads on first use (about a second): only when answers are scored

    return str(py3langid.classify(answer)[0])


def share(flags: Sequence[bool]) -> float | None:
    """The share of True among `flags` (None when there are none)."""
    return sum(flags) / len(flags) if flags else None


def sentence_chrf(answer: str, reference: str) -> float:
    """sacrebleu's sentence-level chrF of one answer, 0-100."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(answer, [reference]).score)


def corpus_chrf(answers: Sequence[str], references: Sequence[str]) -> float | None:
    """sacrebleu's corpus-level chrF (statistics summed over all answers, then scored), 0-100."""
    if not answers:
        return None
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(answers), [list(references)]).score)
