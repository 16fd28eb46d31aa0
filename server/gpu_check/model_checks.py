"""`student merge` and `student train-lora` on a tiny student, on the CPU and on CUDA.

* `merge_bf16_cpu`: `student merge` of a tiny local base + LoRA adapter in bfloat16 on the CPU,
  with its logit verification.
* `merge_bf16_cuda`: the same merge with `--device cuda`; also whether its weight files are
  byte-identical to the CPU merge's.
* `train_lora_cuda`: `student train-lora` on that tiny base on the GPU (bfloat16 base weights,
  a few steps on the bundled support chats): validation loss falls, and the adapter merges on
  the GPU with its logit verification.

PyTorch, transformers, peft and `models.*` are imported inside the checks, so importing this
module stays cheap (`student --help` does).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import models
from server.gpu_check.results import CheckResult, Outcome, cuda_device, run_check, say

DATASET_FILE = Path(models.__file__).resolve().parent / "data" / "support_chats.jsonl"


def build_tiny_student(workdir: Path) -> tuple[Path, Path]:
    """A random Llama (hidden 256, 4 layers) with a tokenizer trained here, and a random LoRA adapter."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models.artifacts import quiet_transformers_progress
    from models.tiny import build_random_llama
    from models.tokenizer import train_tokenizer

    rows = [json.loads(line) for line in DATASET_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [message["content"] for row in rows for message in row["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    adapter_dir = workdir / "adapter"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    with quiet_transformers_progress(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base_dir = build_random_llama(
            tokenizer, workdir / "base", seed=0, hidden_size=256, num_heads=4, num_layers=4, intermediate_size=512
        )
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir))
        get_peft_model(model, config).save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def check_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, device: str) -> Outcome:
    from models.merge import VerificationError, merge_adapter

    def progress(message: str) -> None:
        say(f"merge ({device}): {message}")

    try:
        result = merge_adapter(base_dir, adapter_dir, out_dir, dtype="bfloat16", device=device, progress=progress)
    except VerificationError as error:
        result = error.result
    v = result.verification
    metrics = {
        "device": result.device,
        "dtype": result.dtype,
        "elapsed_s": result.elapsed_s,
        "out_dir": str(result.out_dir),
        "weight_sha256": dict(result.weight_sha256),
        "verification": asdict(v),
    }
    outcome = Outcome(
        f"max |Δlogit| {v.max_abs_diff:.3g} {'≤' if v.passed else '>'} tol {v.tolerance:.3g} (adapter effect "
        f"{v.adapter_effect_max_abs_diff:.3g}), {v.prompts} prompts, {result.elapsed_s:.1f} s",
        metrics,
    )
    outcome.require(v.passed, f"max |Δlogit| {v.max_abs_diff:.3g} above the bfloat16 tolerance {v.tolerance:.3g}")
    outcome.require(
        v.adapter_effect_max_abs_diff > v.tolerance,
        "the adapter changes logits less than the tolerance, so the check proves nothing",
    )
    return outcome


def check_train_lora(base_dir: Path, workdir: Path, device: str) -> Outcome:
    """`train_lora` on `device` (dtype auto: bfloat16 on a GPU), then `merge_adapter` of its adapter there."""
    from models.merge import VerificationError, merge_adapter
    from models.train import TrainConfig
    from models.train_lora import LoraSettings, train_lora

    rows = DATASET_FILE.read_text(encoding="utf-8").splitlines()
    (workdir / "train.jsonl").write_text("\n".join(rows[:64]) + "\n", encoding="utf-8")
    (workdir / "validation.jsonl").write_text("\n".join(rows[64:80]) + "\n", encoding="utf-8")
    config = TrainConfig(steps=8, learning_rate=3e-3, batch_size=8, max_length=256, warmup_steps=0)
    trained = train_lora(
        base_dir,
        workdir / "train.jsonl",
        workdir / f"adapter-{device}",
        config,
        LoraSettings(r=8, alpha=16),
        validation_path=workdir / "validation.jsonl",
        device=device,
        progress=lambda m: say(f"train-lora ({device}): {m}"),
    )
    record: dict[str, Any] = trained.record
    try:
        merged = merge_adapter(base_dir, trained.out_dir, workdir / f"trained-merged-{device}", device=device)
    except VerificationError as error:
        merged = error.result
    loss = record["validation_loss"]
    training = {key: record[key] for key in ("device", "dtype", "validation_loss", "elapsed_s") if key in record}
    metrics = {"training": training, "merge_verification": asdict(merged.verification)}
    outcome = Outcome(
        f"{record['device']} {record['dtype']}: validation loss {loss['before']:.3f} -> {loss['after']:.3f} nats; "
        f"merged max |Δlogit| {merged.verification.max_abs_diff:.3g}",
        metrics,
    )
    outcome.require(loss["after"] < loss["before"], "validation loss did not fall after training")
    outcome.require(merged.verification.passed, "the trained adapter's merge failed its logit verification")
    return outcome


def merge_checks(workdir: Path) -> list[CheckResult]:
    """`merge_bf16_cpu`, `merge_bf16_cuda` and `train_lora_cuda`, sharing one tiny student built in `workdir`."""
    results: list[CheckResult] = []
    student: dict[str, tuple[Path, Path]] = {}

    def merge_on(device: str) -> Outcome:
        if device == "cuda":
            cuda_device()
        if "dirs" not in student:
            say("merge: building a tiny base (Llama, hidden 256, 4 layers) and a LoRA adapter (r=8)")
            student["dirs"] = build_tiny_student(workdir)
        base_dir, adapter_dir = student["dirs"]
        return check_merge(base_dir, adapter_dir, workdir / f"merged-{device}", device)

    for device in ("cpu", "cuda"):
        results.append(
            run_check(
                f"merge_bf16_{device}",
                device if device == "cpu" else "gpu",
                f"student merge --dtype bfloat16 --device {device}, with its logit verification",
                functools.partial(merge_on, device),
            )
        )
    cpu, cuda = results
    if cpu.status == "passed" and cuda.status == "passed":
        cuda.metrics["same_weight_bytes_as_cpu_merge"] = cpu.metrics["weight_sha256"] == cuda.metrics["weight_sha256"]

    def train_on_cuda() -> Outcome:
        cuda_device()
        if "dirs" not in student:
            student["dirs"] = build_tiny_student(workdir)
        return check_train_lora(student["dirs"][0], workdir, "cuda")

    title = "student train-lora on the GPU (bfloat16), validation loss falls, adapter merges and verifies"
    results.append(run_check("train_lora_cuda", "gpu", title, train_on_cuda))
    return results
