"""The shared chat trainer: loss masking, batching, data order, determinism, LoRA-only updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from models.chat_data import ChatSample, DatasetError, Message, load_chat_jsonl
from models.demo import DATASET_FILE
from models.tiny import llama_config
from models.train import (
    IGNORE_INDEX,
    TrainConfig,
    TrainingError,
    TrainResult,
    batch_order,
    collate,
    encode_sample,
    lr_factor,
    total_steps,
    train_causal_lm,
)

SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."


def chat(*turns: tuple[str, str], topic: str | None = None) -> ChatSample:
    return ChatSample(tuple(Message(role, content) for role, content in turns), topic)


TWO_TURNS = chat(
    ("system", SYSTEM),
    ("user", "Shop có nhận thanh toán bằng ví MoMo không?"),
    ("assistant", "Cửa hàng nhận ví MoMo và ZaloPay."),
    ("user", "Còn thẻ Visa thì sao?"),
    ("assistant", "Bạn có thể thanh toán bằng thẻ Visa/Mastercard."),
)


def quiet(_: str) -> None:
    """Progress sink."""


def labelled_text(tokenizer: PreTrainedTokenizerFast, sample: ChatSample, loss_on: str = "assistant") -> str:
    encoded = encode_sample(tokenizer, sample, max_length=512, loss_on=loss_on)
    pairs = zip(encoded.input_ids, encoded.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


def test_only_assistant_turns_and_their_end_marker_are_labelled(
    small_tokenizer: PreTrainedTokenizerFast,
) -> None:
    encoded = encode_sample(small_tokenizer, TWO_TURNS, max_length=512)
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(encoded.input_ids, encoded.labels, strict=True))

    text = labelled_text(small_tokenizer, TWO_TURNS)

    assert text == (
        "Cửa hàng nhận ví MoMo và ZaloPay.<|im_end|>\nBạn có thể thanh toán bằng thẻ Visa/Mastercard.<|im_end|>\n"
    )


def test_loss_on_all_labels_every_token(small_tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = encode_sample(small_tokenizer, TWO_TURNS, max_length=512, loss_on="all")
    assert encoded.labels == encoded.input_ids
    assert labelled_text(small_tokenizer, TWO_TURNS, "all").startswith("<|im_start|>system\n" + SYSTEM)


def test_max_length_cuts_on_the_right_and_samples_without_targets_are_refused(
    small_tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert len(encode_sample(small_tokenizer, TWO_TURNS, max_length=10).input_ids) == 10
    model = AutoModelForCausalLM.from_config(_tiny_config(small_tokenizer))
    with pytest.raises(TrainingError, match="none of the 1 samples has an assistant token within 10 tokens"):
        train_causal_lm(model, small_tokenizer, [TWO_TURNS], TrainConfig(steps=1, max_length=10), quiet)


def test_collate_right_pads_with_ignored_labels(small_tokenizer: PreTrainedTokenizerFast) -> None:
    long = encode_sample(small_tokenizer, TWO_TURNS, max_length=512)
    short = encode_sample(small_tokenizer, TWO_TURNS, max_length=20)

    batch = collate([short, long], pad_token_id=small_tokenizer.pad_token_id)

    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * 20 + [0] * (len(long.input_ids) - 20)
    assert batch["input_ids"][0, 20:].eq(small_tokenizer.pad_token_id).all()
    assert batch["labels"][0, 20:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == list(long.labels)


def test_batch_order_is_seeded_and_covers_each_sample_once_per_epoch() -> None:
    batches = list(batch_order(sample_count=10, batch_size=4, steps=6, seed=3))

    assert [len(batch) for batch in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(index for batch in batches[:3] for index in batch) == list(range(10))
    assert sorted(index for batch in batches[3:] for index in batch) == list(range(10))
    assert batches == list(batch_order(10, 4, 6, seed=3))
    assert batches != list(batch_order(10, 4, 6, seed=4))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    assert lr_factor(0, steps=100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert total_steps(TrainConfig(steps=None, epochs=2, batch_size=16), sample_count=40) == 6


def _tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return llama_config(tokenizer, hidden_size=128, num_heads=2, num_layers=1, intermediate_size=256)


def _train(
    tokenizer: PreTrainedTokenizerFast, samples: list[ChatSample], seed: int
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(tokenizer))
    config = TrainConfig(steps=12, batch_size=8, learning_rate=3e-3, seed=seed, warmup_steps=2, log_every=4)
    result = train_causal_lm(model, tokenizer, samples, config, quiet)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}, result


@pytest.mark.e2e
def test_training_lowers_the_loss_and_is_deterministic_for_a_seed(
    small_tokenizer: PreTrainedTokenizerFast,
) -> None:
    samples = load_chat_jsonl(DATASET_FILE)[:64]
    messages: list[str] = []

    weights, result = _train(small_tokenizer, samples, seed=5)
    again, _ = _train(small_tokenizer, samples, seed=5)
    other, _ = _train(small_tokenizer, samples, seed=6)

    assert result.steps == 12 and result.samples == 64
    assert result.final_loss < result.first_loss - 0.5
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert not all(torch.equal(weights[name], other[name]) for name in weights)
    model = AutoModelForCausalLM.from_config(_tiny_config(small_tokenizer))
    config = TrainConfig(steps=4, log_every=2)
    train_causal_lm(model, small_tokenizer, samples[:8], config, messages.append, "warm-up")
    assert messages[-1].startswith("warm-up step 4/4 loss ")
    assert not torch.are_deterministic_algorithms_enabled(), "the deterministic mode must be restored"


def test_lora_training_changes_only_the_adapter(tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)), lora)
    samples = load_chat_jsonl(DATASET_FILE)[:16]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    train_causal_lm(model, small_tokenizer, samples, TrainConfig(steps=3, batch_size=8), quiet)

    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


def test_load_chat_jsonl_reads_messages_and_topic(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": "Chào bạn!"}]
    row = {"messages": messages, "topic": "greeting"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n\n", encoding="utf-8")

    assert load_chat_jsonl(path) == [chat(("user", "Xin chào"), ("assistant", "Chào bạn!"), topic="greeting")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "chats.jsonl line 2: not valid JSON"),
        ('{"text": "Xin chào"}', 'chats.jsonl line 2: expected an object with a "messages" list'),
        ('{"messages": [{"role": "bot", "content": "Chào"}]}', "line 2: message 0 has role 'bot'"),
        ('{"messages": [{"role": "user"}]}', 'chats.jsonl line 2: message 0 has no text "content"'),
        ('{"messages": []}', 'chats.jsonl line 2: "messages" is empty'),
    ],
)
def test_load_chat_jsonl_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_chat_jsonl(path)


def test_load_chat_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_chat_jsonl(tmp_path / "absent.jsonl")
