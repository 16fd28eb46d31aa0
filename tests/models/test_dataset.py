"""The bundled data in models/data: schema, coverage, Vietnamese text, and in sync with its script."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from models.demo import DATASET_FILE, PROMPTS_FILE
from tests.models.helpers import VIETNAMESE_LETTERS

TOPICS = {
    "order_tracking",
    "return_policy",
    "payment_methods",
    "discount_code",
    "warranty",
    "late_delivery",
    "size_exchange",
}
SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dataset", DATASET_FILE.parent / "build_dataset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_chats_have_a_clean_schema_and_cover_every_topic() -> None:
    chats = rows(DATASET_FILE)

    assert len(chats) >= 300
    assert Counter(chat["topic"] for chat in chats).keys() == TOPICS
    for chat in chats:
        assert set(chat) == {"messages", "topic"}
        assert [message["role"] for message in chat["messages"]] == ["system", "user", "assistant"]
        assert all(set(message) == {"role", "content"} for message in chat["messages"])
        assert chat["messages"][0]["content"] == SYSTEM
        answer = chat["messages"][2]["content"]
        assert 1 <= answer.count(".") + answer.count("?") <= 4, answer
        assert VIETNAMESE_LETTERS & set(answer.lower())
    assert len({chat["messages"][1]["content"] for chat in chats}) > len(chats) // 2, "questions must vary"


def test_answers_carry_the_policy_facts() -> None:
    chats = rows(DATASET_FILE)
    answers = {
        topic: " ".join(chat["messages"][2]["content"] for chat in chats if chat["topic"] == topic)
        for topic in TOPICS
    }

    assert all(fact in answers["return_policy"] for fact in ("30 ngày", "nguyên tem", "nhà sản xuất"))
    warranty_facts = ("12 tháng", "7-14 ngày làm việc", "rơi vỡ", "vào nước", "tự ý sửa chữa")
    assert all(fact in answers["warranty"] for fact in warranty_facts)
    assert all(fact in answers["payment_methods"] for fact in ("COD", "chuyển khoản", "MoMo"))


def test_demo_prompts_ask_one_question_per_topic() -> None:
    prompts = rows(PROMPTS_FILE)

    assert sorted(prompt["topic"] for prompt in prompts) == sorted(TOPICS)
    for prompt in prompts:
        assert set(prompt) == {"messages", "topic"}
        assert [message["role"] for message in prompt["messages"]] == ["system", "user"]
        assert prompt["messages"][0]["content"] == SYSTEM


def test_committed_files_match_the_generator(build_script: ModuleType, tmp_path: Path) -> None:
    build_script.main(tmp_path)

    assert (tmp_path / DATASET_FILE.name).read_bytes() == DATASET_FILE.read_bytes()
    assert (tmp_path / PROMPTS_FILE.name).read_bytes() == PROMPTS_FILE.read_bytes()


def test_answers_never_quote_customer_details(build_script: ModuleType) -> None:
    """A tiny model cannot copy an order number; trained on answers that quote one, it invents one."""
    for chat in build_script.build_chats(random.Random(1)):
        answer = chat["messages"][2]["content"]
        assert "{" not in answer
        assert not re.search(r"DH\d|\d{2,}\.000đ", answer), answer
        assert not any(code in answer for code in build_script.CODES), answer
