"""Random-weight Llama models for tests: seconds to build, loadable by transformers and vLLM.

vLLM's CPU attention rejects head_dim 16, so the head size is fixed at 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HEAD_DIM = 64


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
) -> LlamaConfig:
    """A small Llama config whose special-token ids match `tokenizer`."""
    if hidden_size != num_heads * HEAD_DIM:
        raise ValueError(f"hidden_size must be num_heads * {HEAD_DIM} (vLLM CPU attention)")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """Save weights (safetensors), tokenizer, chat template and generation config for vLLM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    return out_dir


def build_random_llama(tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int = 0, **config_kwargs: int) -> Path:
    """Build and save a random-weight Llama for `tokenizer`; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, **config_kwargs))
    return save_model(model, tokenizer, out_dir)
