"""The shop data in models/data follows one knowledge card, teaches it, and keeps its eval set held out.

Fast checks without a model: the generator is deterministic and the committed files are its output;
`student dataset check` passes on the training chats; every answer states its topic's card facts;
every eval item's required facts come from the card and its reference states them; eval questions
share no phrasing, no 6-word run and no order number with the training questions; the training questions
come from many templates per topic, and their surface details (amounts, order numbers, "miễn phí",
shipping words) occur across topics, so that none of them alone tells a topic.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from models.dataset_check import check_dataset, question_key

DATA_DIR = Path(__file__).resolve().parents[2] / "models" / "data"
SCRIPT = DATA_DIR / "build_dataset.py"
CARD = DATA_DIR / "shop_card.json"
CHATS = DATA_DIR / "support_chats.jsonl"
PROMPTS = DATA_DIR / "demo_prompts.jsonl"
EVAL = DATA_DIR / "eval_set.jsonl"
GENERATED = (CHATS, PROMPTS, EVAL)
SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."
HELD_OUT_NGRAM = 6
ORDER = re.compile(r"DH\d{6}")
AMOUNT = re.compile(r"\d{1,3}(?:\.\d{3})+ ?đ|\d+k\b|\d+ triệu")
Row = dict[str, Any]
GENERIC_SENTENCES = (
    "Cảm ơn bạn đã liên hệ với cửa hàng.",
    "Dạ, shop xin lỗi vì sự bất tiện này ạ.",
    "Bạn vui lòng chờ trong giây lát, shop kiểm tra ngay ạ.",
    "Dạ, shop đã ghi nhận yêu cầu của bạn và sẽ phản hồi sớm nhất.",
    "Xin chào, shop có thể giúp gì cho bạn?",
)


def rows(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def normalised(text: str) -> str:
    """NFC, whitespace collapsed, casefolded: the text a fact's alternatives are matched in."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def states(text: str, alternatives: Sequence[str]) -> bool:
    """Whether `text` states a fact: one of its alternatives occurs in it, case-insensitively."""
    body = normalised(text)
    return any(normalised(alternative) in body for alternative in alternatives)


def unaccented(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def ngrams(text: str) -> set[tuple[str, ...]]:
    """Runs of HELD_OUT_NGRAM words of the question key, with and without diacritics."""
    grams: set[tuple[str, ...]] = set()
    for form in (question_key(text), question_key(unaccented(text))):
        words = form.split()
        grams.update(tuple(words[i : i + HELD_OUT_NGRAM]) for i in range(len(words) - HELD_OUT_NGRAM + 1))
    return grams


def user_text(row: Row) -> str:
    return str(row["messages"][1]["content"])


def answer_text(row: Row) -> str:
    return str(row["messages"][2]["content"])


@pytest.fixture(scope="module")
def card() -> Row:
    return json.loads(CARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def facts(card: Row) -> dict[str, Row]:
    """Every fact of the card by id, with its topic added."""
    return {fact["id"]: {**fact, "topic": topic["id"]} for topic in card["topics"] for fact in topic["facts"]}


@pytest.fixture(scope="module")
def topics(card: Row) -> list[str]:
    return [topic["id"] for topic in card["topics"]]


@pytest.fixture(scope="module")
def chats() -> list[Row]:
    return rows(CHATS)


@pytest.fixture(scope="module")
def eval_items() -> list[Row]:
    return rows(EVAL)


@pytest.fixture(scope="module")
def build_script() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("build_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


# --- the generator --------------------------------------------------------------------------


def test_the_generator_is_deterministic_and_wrote_the_committed_files(build_script: ModuleType, tmp_path: Path) -> None:
    by_script, in_process = tmp_path / "script", tmp_path / "in-process"
    subprocess.run([sys.executable, str(SCRIPT), str(by_script)], check=True, timeout=60)
    build_script.main(in_process)

    for committed in GENERATED:
        assert (by_script / committed.name).read_bytes() == committed.read_bytes(), committed.name
        assert (in_process / committed.name).read_bytes() == committed.read_bytes(), committed.name
        assert b"\r" not in committed.read_bytes()


def test_dataset_check_passes_on_the_training_chats() -> None:
    report = check_dataset(CHATS)

    assert report.passed, report.problems
    assert report.samples >= 1900
    assert {count.task: count.samples for count in report.tasks} == {"response": report.samples}
    assert report.exact_duplicates == () and report.near_duplicate_questions == ()
    assert report.malformed == () and report.near_empty == ()


def test_dataset_check_cli_exits_zero() -> None:
    command = [sys.executable, "-m", "server.runtime.cli", "dataset", "check", str(CHATS)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: passed" in result.stdout


# --- the card -------------------------------------------------------------------------------


def test_the_card_is_readable_facts_with_robust_alternatives(
    card: Row, facts: dict[str, Row], topics: list[str]
) -> None:
    assert card["shop"]["name"]
    assert len(topics) == len(set(topics)) >= 12
    assert len(facts) == sum(len(topic["facts"]) for topic in card["topics"])
    for topic in card["topics"]:
        assert 2 <= len(topic["facts"]) <= 6, topic["id"]
        assert any(fact["core"] for fact in topic["facts"]), topic["id"]
    for fact_id, fact in facts.items():
        alternatives = fact["alternatives"]
        assert isinstance(fact["core"], bool), fact_id
        assert alternatives and len(set(map(normalised, alternatives))) == len(alternatives), fact_id
        assert states(str(fact["statement"]), alternatives[:1]), f"{fact_id}: the statement uses its canonical form"
        for alternative in alternatives:
            assert alternative == unicodedata.normalize("NFC", alternative) == " ".join(alternative.split())
            too_short = len(alternative) < 3 or (alternative.isdigit() and len(alternative) < 6)  # no bare "30"
            assert not too_short, f"{fact_id}: {alternative!r} would match by accident"


def test_the_card_keeps_the_shop_policies(facts: dict[str, Row]) -> None:
    expected = {
        "return_window": "30 ngày",
        "refund_time": "5-7 ngày",
        "size_free_once": "miễn phí một lần",
        "size_window": "30 ngày",
        "warranty_period": "12 tháng",
        "warranty_processing": "7-14 ngày",
        "pay_ewallet": "MoMo, ZaloPay",
        "pay_card": "Visa/Mastercard",
        "pay_cod": "COD",
    }
    for fact_id, value in expected.items():
        assert facts[fact_id]["alternatives"][0] == value


def test_alternatives_never_match_generic_sentences(facts: dict[str, Row]) -> None:
    for fact_id, fact in facts.items():
        for sentence in GENERIC_SENTENCES:
            assert not states(sentence, fact["alternatives"]), (fact_id, sentence)


def test_facts_of_a_topic_cannot_be_mistaken_for_each_other(facts: dict[str, Row]) -> None:
    for fact_id, fact in facts.items():
        for other_id, other in facts.items():
            if other_id == fact_id or other["topic"] != fact["topic"]:
                continue
            for alternative in fact["alternatives"]:
                assert not states(alternative, other["alternatives"]), (fact_id, other_id)


def test_the_shop_documents_agree_with_the_card(facts: dict[str, Row]) -> None:
    documents = " ".join(path.read_text(encoding="utf-8") for path in sorted((DATA_DIR / "shop_docs").glob("*.md")))
    stated_in_documents = (
        "return_window", "return_condition", "refund_time", "size_free_once", "size_condition", "warranty_period",
        "warranty_processing", "warranty_exclusions", "pay_bank_transfer", "pay_card", "pay_ewallet", "cod_limit",
        "installment_minimum", "installment_terms", "one_code_per_order", "first_order_code", "shipping_flat",
        "free_shipping", "delivery_inner", "delivery_big_city", "delivery_province", "late_voucher", "hotline",
        "hotline_hours", "support_email", "showroom_hanoi", "showroom_hcm", "showroom_hours",
    )  # fmt: skip
    for fact_id in stated_in_documents:
        assert states(documents, facts[fact_id]["alternatives"]), fact_id
    assert "1900 1234" not in documents and "từ ngày mua" not in documents


# --- training chats -------------------------------------------------------------------------


def test_training_chats_have_the_schema_and_cover_every_topic(chats: list[Row], topics: list[str]) -> None:
    counts = Counter(chat["topic"] for chat in chats)

    assert len(chats) >= 1900
    assert sorted(counts) == sorted(topics) and min(counts.values()) >= 140
    for chat in chats:
        assert list(chat) == ["messages", "topic", "task"] and chat["task"] == "response"
        assert [message["role"] for message in chat["messages"]] == ["system", "user", "assistant"]
        assert chat["messages"][0]["content"] == SYSTEM
    keys = [question_key(user_text(chat)) for chat in chats]
    assert len(set(keys)) == len(keys)


def test_every_topic_has_many_training_templates(build_script: ModuleType) -> None:
    for topic in build_script.TOPICS:
        texts = [question.text for question in topic.train]
        assert len(set(texts)) == len(texts) >= 25, topic.name


def test_surface_details_of_the_questions_occur_across_topics(chats: list[Row]) -> None:
    """A small model picks a topic by surface cues when they come with one topic only (a large amount
    with installments, "miễn phí" with cancellations, an order number with tracking): each cue occurs in
    the questions of several topics, and no topic has most of the questions that carry it."""
    words = {
        "miễn phí / free": re.compile(r"\bmien phi\b|\bfree"),
        "ship / vận chuyển / giao hàng": re.compile(r"\bship\b|\bvan chuyen\b|\bgiao hang\b"),
    }  # matched in the question without diacritics, casefolded
    for cue, pattern in {"VND amount": AMOUNT, "order number": ORDER, **words}.items():
        topics = Counter(
            chat["topic"]
            for chat in chats
            if pattern.search(unaccented(user_text(chat)).casefold() if cue in words else user_text(chat))
        )
        assert len(topics) >= 4, (cue, topics)
        assert max(topics.values()) <= sum(topics.values()) / 2, (cue, topics)


def test_training_answers_are_short_and_never_quote_the_customer(
    build_script: ModuleType, chats: list[Row], facts: dict[str, Row]
) -> None:
    words = [len(answer_text(chat).split()) for chat in chats]
    card_forms = {alternative for fact in facts.values() for alternative in fact["alternatives"]}

    assert 25 <= sum(words) / len(words) <= 60
    assert min(words) >= 20 and max(words) <= 60
    for chat in chats:
        answer = answer_text(chat)
        assert answer.startswith("Dạ, ") and "{" not in answer, answer
        assert 1 <= len(re.findall(r"[.?!](?=\s|$)", answer)) <= 3, answer  # 1-3 sentences
        assert not re.search(r"DH\d", answer), answer
        assert set(AMOUNT.findall(answer)) <= card_forms, answer  # amounts of the card, never the customer's
        assert not any(code in answer for code in build_script.CODES), answer
        assert not any(product in answer for product in build_script.PRODUCTS), answer


def test_every_training_answer_states_its_topics_core_facts(chats: list[Row], facts: dict[str, Row]) -> None:
    core = {fact_id: fact for fact_id, fact in facts.items() if fact["core"]}
    for chat in chats:
        for fact_id, fact in core.items():
            if fact["topic"] == chat["topic"]:
                assert states(answer_text(chat), fact["alternatives"]), (fact_id, answer_text(chat))


def test_delivery_answers_give_the_region_of_the_place_asked_about(chats: list[Row], facts: dict[str, Row]) -> None:
    regions = {fact_id: fact for fact_id, fact in facts.items() if fact.get("places")}
    assert len(regions) == 3
    for chat in (chat for chat in chats if chat["topic"] == "delivery_time"):
        asked = normalised(unaccented(user_text(chat)))
        named = {
            fact_id
            for fact_id, fact in regions.items()
            for place in fact["places"]
            if normalised(unaccented(place)) in asked
        }
        assert len(named) <= 1, user_text(chat)
        expected = named or set(regions)  # a question without a place gets every region
        for fact_id, fact in regions.items():
            stated = states(answer_text(chat), fact["alternatives"])
            assert stated == (fact_id in expected), (user_text(chat), answer_text(chat))


def test_every_card_fact_is_taught_by_several_answers(chats: list[Row], facts: dict[str, Row]) -> None:
    for fact_id, fact in facts.items():
        answers = [answer_text(chat) for chat in chats if chat["topic"] == fact["topic"]]
        assert sum(states(answer, fact["alternatives"]) for answer in answers) >= 5, fact_id


def test_demo_prompts_ask_one_question_per_topic(topics: list[str]) -> None:
    prompts = rows(PROMPTS)

    assert sorted(prompt["topic"] for prompt in prompts) == sorted(topics)
    assert [prompt["topic"] for prompt in prompts[:3]] == ["order_tracking", "return_policy", "payment_methods"]
    for prompt in prompts:
        assert list(prompt) == ["messages", "topic", "task"]
        assert [message["role"] for message in prompt["messages"]] == ["system", "user"]
        assert prompt["messages"][0]["content"] == SYSTEM


# --- the eval set ---------------------------------------------------------------------------


def test_eval_items_have_the_schema_and_cover_every_topic(eval_items: list[Row], topics: list[str]) -> None:
    counts = Counter(item["topic"] for item in eval_items)

    assert len(eval_items) >= 120
    assert sorted(counts) == sorted(topics) and min(counts.values()) >= 6
    assert len({item["id"] for item in eval_items}) == len(eval_items)
    for item in eval_items:
        assert list(item) == ["id", "topic", "messages", "facts", "fact_ids", "reference"]
        assert [message["role"] for message in item["messages"]] == ["system", "user"]
        assert item["messages"][0]["content"] == SYSTEM
    keys = [question_key(user_text(item)) for item in eval_items]
    assert len(set(keys)) == len(keys)


def test_eval_facts_come_from_the_card_and_the_reference_states_them(
    eval_items: list[Row], facts: dict[str, Row]
) -> None:
    for item in eval_items:
        fact_ids = item["fact_ids"]
        assert 1 <= len(fact_ids) <= 3 and len(set(fact_ids)) == len(fact_ids), item["id"]
        assert item["facts"] == [facts[fact_id]["alternatives"] for fact_id in fact_ids], item["id"]
        for fact_id in fact_ids:
            assert facts[fact_id]["topic"] == item["topic"], item["id"]
            assert states(str(item["reference"]), facts[fact_id]["alternatives"]), (item["id"], fact_id)


def test_eval_questions_are_held_out_from_training(chats: list[Row], eval_items: list[Row]) -> None:
    train_questions = [user_text(chat) for chat in chats]
    train_keys = {question_key(question) for question in train_questions}
    train_grams = set().union(*map(ngrams, train_questions))
    train_orders = {order for question in train_questions for order in ORDER.findall(question)}
    eval_orders = {order for item in eval_items for order in ORDER.findall(user_text(item))}

    assert train_orders and eval_orders and not train_orders & eval_orders
    assert all("DH100000" <= order <= "DH599999" for order in train_orders)
    assert all("DH800000" <= order <= "DH999999" for order in eval_orders)
    for item in eval_items:
        question = user_text(item)
        assert question_key(question) not in train_keys, question
        assert not ngrams(question) & train_grams, (question, sorted(ngrams(question) & train_grams))


def test_eval_templates_and_greetings_come_from_their_own_pools(build_script: ModuleType) -> None:
    train_templates = {question.text for topic in build_script.TOPICS for question in topic.train}
    eval_templates = {question.text for topic in build_script.TOPICS for question in topic.held_out}

    assert all(len(topic.held_out) >= 6 for topic in build_script.TOPICS)
    assert not train_templates & eval_templates
    assert not (set(build_script.TRAIN_OPENERS) & set(build_script.EVAL_OPENERS)) - {""}
