"""Builders of tiny real models and adapters for the models/ tests (seconds each)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIETNAMESE_LETTERS = frozenset("àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ")


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    target_modules: Sequence[str] = ALL_LINEAR,
    seed: int = 1,
    save_tokenizer: bool = False,
    rank: int = 4,
) -> Path:
    """A LoRA adapter with random non-zero A and B (init_lora_weights=False), so it changes logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft notes GPT-2's Conv1D and saved embeddings
        get_peft_model(model, config).save_pretrained(str(out_dir))
    if save_tokenizer:
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    return out_dir


def build_tiny_gpt2(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """A one-layer GPT-2: its attention is `c_attn`, a name no Llama module has."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=1,
        n_head=2,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chat_ids(tokenizer: PreTrainedTokenizerFast, question: str) -> torch.Tensor:
    """A Vietnamese support prompt through the chat template, as a [1, tokens] batch."""
    messages = [
        {"role": "system", "content": "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."},
        {"role": "user", "content": question},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits[0].float()
