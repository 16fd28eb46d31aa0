"""Fact matching, recall arithmetic, flags and chrF: pure functions, from strings."""

from __future__ import annotations

import unicodedata

import pytest

from models.evaluation.eval_set import EvalItem
from models.evaluation.scoring import (
    FactMatch,
    corpus_chrf,
    exact_answer_rate,
    fact_recall,
    fact_stated,
    is_empty,
    is_refusal,
    language,
    match_facts,
    sentence_chrf,
    share,
)


def eval_item(*facts: tuple[str, ...]) -> EvalItem:
    ids = tuple(f"fact{index}" for index in range(len(facts)))
    return EvalItem("x", "topic", ({"role": "user", "content": "?"},), tuple(facts), ids, "Dạ, tham khảo ạ.")


def test_facts_match_across_case_whitespace_and_unicode_forms() -> None:
    decomposed = unicodedata.normalize("NFD", "Hoàn tiền trong 5-7 ngày làm việc")
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert fact_stated(decomposed, ["5-7 ngày làm việc"])
    assert fact_stated("Gọi  HOTLINE\n1900   6868 nhé", ["1900 6868"])
    assert fact_stated("ĐỔI TRẢ TRONG 30 NGÀY", ["30 ngày"])
    assert fact_stated("trong ba mươi ngày", ["30 ngày", "ba mươi ngày"])


def test_diacritics_matter() -> None:
    assert not fact_stated("doi tra trong 30 ngay", ["30 ngày"])
    assert not fact_stated("30 ngay", ["30 ngày"])
    assert not fact_stated("", ["30 ngày"])


def test_recall_counts_facts_and_exact_answers_count_items() -> None:
    item = eval_item(("30 ngày",), ("1900 6868",), ("COD",))
    full = match_facts("30 ngày, gọi 1900 6868, có COD", item)
    partial = match_facts("Gọi 1900 6868 ạ", item)
    single = match_facts("Dạ, 30 ngày ạ", eval_item(("30 ngày",)))
    assert full == FactMatch(("fact0", "fact1", "fact2"), ())
    assert partial == FactMatch(("fact1",), ("fact0", "fact2"))
    assert fact_recall([full, partial, single]) == pytest.approx(5 / 7)
    assert exact_answer_rate([full, partial, single]) == pytest.approx(2 / 3)
    assert fact_recall([]) is None and exact_answer_rate([]) is None


def test_empty_answers_have_no_letter_or_digit() -> None:
    assert is_empty("") and is_empty("  \n ") and is_empty("...!?") and is_empty("🙂 —")
    assert not is_empty("ạ") and not is_empty("5")


@pytest.mark.parametrize(
    "text",
    [
        "Xin lỗi, tôi không thể giúp bạn việc này.",
        "XIN LỖI,  TÔI KHÔNG THỂ trả lời.",
        "Tôi không thể trả lời câu hỏi này.",
        "I can’t help with that.",
        "I cannot answer.",
        "As an AI language model, I ...",
        "Là một mô hình ngôn ngữ, tôi không có thông tin.",
    ],
)
def test_refusals_are_found(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Dạ, shop không thể hủy đơn đã giao cho đơn vị vận chuyển ạ.",
        "Dạ, rất tiếc, mã giảm giá đã hết hạn ạ.",
        "",
    ],
)
def test_ordinary_answers_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_language_is_classified_only_for_non_empty_answers() -> None:
    assert language("Dạ, bạn có thể đổi trả sản phẩm trong vòng 30 ngày kể từ ngày nhận hàng ạ.") == "vi"
    assert language("Your order ships within two business days from our warehouse.") == "en"
    assert language(" ... ") is None


def test_shares() -> None:
    assert share([True, False, False, True]) == 0.5
    assert share([]) is None


def test_chrf_is_100_for_the_reference_and_low_for_nonsense() -> None:
    reference = "Dạ, bạn được đổi trả trong 30 ngày ạ."
    assert sentence_chrf(reference, reference) == pytest.approx(100.0)
    assert sentence_chrf("qzx wvv", reference) < 10
    assert sentence_chrf("", reference) == 0.0
    corpus = corpus_chrf([reference, "qzx"], [reference, "Dạ, hotline 1900 6868 ạ."])
    assert corpus is not None and 0 < corpus < 100
    assert corpus_chrf([], []) is None
