"""The locally trained tokenizer: lossless on Vietnamese, ChatML template, special-token ids."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from models.tokenizer import EOS, IM_START, PAD


def test_round_trips_vietnamese_text_it_never_saw(small_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Quý khách vui lòng chờ 7–14 ngày làm việc; phí 35.000đ được hoàn lại 🙏"
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.unk_token_id not in ids


def test_chat_template_is_chatml_ending_in_the_eos_token(small_tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Hệ thống"}, {"role": "user", "content": "Xin chào"}]
    text = small_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert text == (
        "<|im_start|>system\nHệ thống<|im_end|>\n<|im_start|>user\nXin chào<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(small_tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(small_tokenizer.eos_token_id) == 2


def test_special_tokens(small_tokenizer: PreTrainedTokenizerFast) -> None:
    assert small_tokenizer.eos_token == EOS
    assert small_tokenizer.pad_token == PAD
    special_ids = {small_tokenizer.pad_token_id, small_tokenizer.bos_token_id, small_tokenizer.eos_token_id}
    assert len(special_ids) == 3
