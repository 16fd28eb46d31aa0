"""Session-wide tiny real parts for the models/ tests: a tokenizer, a random Llama, an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from models.demo import DATASET_FILE
from models.tiny import build_random_llama
from models.tokenizer import train_tokenizer
from tests.models.helpers import make_lora_adapter


@pytest.fixture(scope="session")
def support_texts() -> list[str]:
    """Every message text of the bundled dataset."""
    rows = [json.loads(line) for line in DATASET_FILE.read_text(encoding="utf-8").splitlines()]
    return [message["content"] for row in rows for message in row["messages"]]


@pytest.fixture(scope="session")
def small_tokenizer(support_texts: list[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(support_texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A random-weight Llama, hidden 128 (2 heads of 64), 2 layers."""
    return build_random_llama(small_tokenizer, tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A non-zero LoRA adapter on every linear layer of `tiny_base`."""
    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapter"))
