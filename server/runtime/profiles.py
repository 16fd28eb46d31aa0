"""Named hardware profiles for `student serve --profile NAME`: tested starting points, not magic.

A profile only fills settings the user left alone: explicit flags and `STUDENT_*` variables win.
The RTX 4090 has 24 GB. A 7B-class student in bfloat16 takes about 15 GB of weights, which
leaves about 7 GB of KV cache at `gpu_memory_utilization` 0.92: with grouped-query attention
(Qwen2.5-7B: 28 layers × 4 KV heads × 128 × 2 bytes × 2 ≈ 56 KiB per token) that is about
120,000 tokens, 32 conversations of 4,096 tokens with room to spare; a model without GQA
(Llama-2-7B, 512 KiB per token) fits only about 14,000 tokens, so lower `--max-num-seqs` there.
FP8 (weights quantized by vLLM at load, Ada supports it) halves the weights to about 8 GB; an
AWQ 4-bit student (quantized beforehand; vLLM reads that from its config) takes about 5 GB.
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "rtx4090": {
        "device": "gpu",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.92,
        "max_model_len": 4096,
        "max_num_seqs": 32,
    },
    "rtx4090-fp8": {
        "device": "gpu",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.92,
        "max_model_len": 8192,
        "max_num_seqs": 64,
        "vllm_extra_args": ["--quantization", "fp8"],
    },
    "rtx4090-awq": {
        "device": "gpu",
        "dtype": "float16",
        "gpu_memory_utilization": 0.92,
        "max_model_len": 8192,
        "max_num_seqs": 64,
    },
}


def profile_settings(name: str) -> dict[str, Any]:
    """The settings a profile fills in; KeyError names the known profiles."""
    try:
        return dict(PROFILES[name])
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
