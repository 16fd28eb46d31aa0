"""`student train-lora`: a peft LoRA fine-tune of a base model on chat JSONL, ready for `student merge`.

The training itself is `models.train.train_causal_lm` (chat template applied, loss on the
assistant turns and their end-of-turn marker only, seeded data order), the same trainer that
builds the demo student's adapter. This module adds the command around it:

- checks before anything heavy loads: the base directory holds a causal LM transformers can load,
  a tokenizer with a chat template, the data files parse (`load_chat_jsonl`), the target modules
  exist in the base, `--out` is new or empty (or `--force`);
- `reasoning` fields (written by `student distill` for `cot` samples) are put in front of the last
  assistant answer as `<think>\\n…\\n</think>\\n\\n` unless that answer already has `<think>`, so the
  student learns the reasoning as well as the answer; `--reasoning drop` keeps answers only: the
  field is ignored and every `<think>…</think>` block (with the whitespace after it) is cut out of
  the assistant turns, where `student distill` already wrote it for `cot` samples;
- validation loss before and after training when `--validation` is given: mean cross-entropy per
  assistant token in nats (`models.train.evaluate_loss`);
- checkpoints (`--checkpoint-every`, on by default): the training state is saved beside `--out`
  and a stopped run resumes from it when the same command is run again (same base, data and
  settings; anything else is refused with a message), then deleted when the adapter is written;
- the output directory, written atomically (a staging directory renamed into place), holds the
  PeftModel's `save_pretrained` (adapter_config.json, adapter_model.safetensors), the base's
  tokenizer files, and `training.json` (configuration, per-step losses, validation losses,
  device, versions, elapsed time).

Devices: `--device auto` trains on CUDA when `torch.cuda.is_available()`, else on the CPU. The GPU
path differs only in where the model and batches live, the default dtype (bfloat16 base weights
where the GPU supports it; the LoRA weights stay float32, peft's default), and determinism
(cuBLAS gets `CUBLAS_WORKSPACE_CONFIG=:4096:8`; kernels without a deterministic version warn
instead of failing). It has not been run on a GPU by this module's tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from models import artifacts, merge
from models.arguments import positive_float, positive_int
from models.chat_data import ChatSample, DatasetError, Message, load_chat_jsonl
from models.merge import MergeError
from models.train import (
    Checkpointing,
    Progress,
    TrainConfig,
    TrainingError,
    evaluate_loss,
    stderr_progress,
    total_steps,
    train_causal_lm,
)

TRAINING_RECORD = "training.json"
TRAINING_RECORD_FORMAT = "student-train-lora/1"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ReasoningMode = Literal["inline", "drop"]
CUBLAS_DETERMINISM = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
DEFAULT_CHECKPOINT_EVERY = 25
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class TrainLoraError(Exception):
    """The fine-tune cannot run as asked; the message says what to fix."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape: rank `r`, scale `alpha / r`, dropout, and the module names it wraps."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS


@dataclass(frozen=True)
class TrainLoraResult:
    out_dir: Path
    record: dict[str, object]


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when PyTorch sees a GPU, else the CPU; `cuda` without one is an error that says why."""
    if device not in DEVICES:
        raise TrainLoraError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return artifacts.check_device(device)
    except artifacts.DeviceError as error:
        raise TrainLoraError(str(error)) from None


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto`: bfloat16 on a GPU that supports it, float32 otherwise."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        raise TrainLoraError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype


def check_base(base_dir: Path) -> PreTrainedModel:
    """The base's architecture without weights, after merge's checks (same wording) of its directory."""
    try:
        merge.check_input_dir(base_dir, "base", ("config.json",), "expected a model (save_pretrained)")
        merge.check_input_dir(base_dir, "base", merge.TOKENIZER_FILES, "training needs the base's tokenizer")
        return merge.load_meta_base(base_dir)
    except MergeError as error:
        raise TrainLoraError(str(error)) from None


def load_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """The base's tokenizer; it must have a chat template (training renders chats with it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise TrainLoraError(
            f"the tokenizer in {base_dir} has no chat template, so chats cannot be rendered for training; "
            "add the template of the chat model this base belongs to: a chat_template.jinja file in "
            f'{base_dir}, or a "chat_template" entry in its tokenizer_config.json '
            "(tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR) writes it)"
        )
    return tokenizer


def with_reasoning(sample: ChatSample, reasoning: object) -> tuple[ChatSample, bool]:
    """Put `reasoning` in front of the last assistant answer unless it is empty or `<think>` is there."""
    if not isinstance(reasoning, str) or not reasoning.strip():
        return sample, False
    answers = [index for index, message in enumerate(sample.messages) if message.role == "assistant"]
    last = answers[-1] if answers else None
    if last is None or "<think>" in sample.messages[last].content:
        return sample, False
    answer = sample.messages[last].content
    messages = list(sample.messages)
    messages[last] = Message("assistant", f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}")
    return replace(sample, messages=tuple(messages)), True


def without_reasoning(sample: ChatSample) -> tuple[ChatSample, bool]:
    """Cut every `<think>…</think>` block (and the whitespace after it) out of the assistant turns."""
    messages = tuple(
        Message(message.role, THINK_BLOCK.sub("", message.content)) if message.role == "assistant" else message
        for message in sample.messages
    )
    if messages == sample.messages:
        return sample, False
    return replace(sample, messages=messages), True


def template_drops_reasoning(tokenizer: PreTrainedTokenizerBase, samples: Sequence[ChatSample]) -> bool:
    """True when the chat template renders the first answer holding `<think>` without it.

    Some reasoning models' templates (DeepSeek-R1 distills, Qwen3) cut `<think>…</think>` out of
    assistant turns in the history, which would silently train on the final answers only.
    """
    for sample in samples:
        reasoned = [m.content for m in sample.messages if m.role == "assistant" and "</think>" in m.content]
        if reasoned:
            rendered = tokenizer.apply_chat_template(sample.as_dicts(), tokenize=False)
            return not all(content in rendered for content in reasoned)
    return False


def load_samples(path: Path, reasoning: ReasoningMode) -> tuple[list[ChatSample], int]:
    """The chats of `path` (validated by `load_chat_jsonl`) and how many `reasoning` changed.

    `inline`: the samples that got their `reasoning` field put into the answer; `drop`: the samples
    that had `<think>…</think>` cut out of an assistant turn.
    """
    samples = load_chat_jsonl(path)
    if reasoning == "drop":
        changed = [without_reasoning(sample) for sample in samples]
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        changed = [with_reasoning(sample, row.get("reasoning")) for sample, row in zip(samples, rows, strict=True)]
    return [sample for sample, _ in changed], sum(was_changed for _, was_changed in changed)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the model's linear layers (what LoRA `target_modules` can wrap)."""
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def _matches(target: str, names: Sequence[str]) -> bool:
    """peft's rule for a plain name: the module's full name is `target` or ends with `.target`."""
    return any(name == target or name.endswith(f".{target}") for name in names)


def check_targets(model: torch.nn.Module, targets: Sequence[str], base_dir: Path, progress: Progress) -> None:
    """Every target missing from the base is reported; all missing is an error listing what exists."""
    if list(targets) == ["all-linear"]:
        return
    linear = linear_module_names(model)
    missing = [target for target in targets if not _matches(target, linear)]
    if len(missing) == len(targets):
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise TrainLoraError(
            f"none of the target modules {', '.join(targets)} is a linear layer of the base in {base_dir}; "
            f"its linear layers are named {', '.join(available)}: pass --target-modules with some of "
            "them (or all-linear)"
        )
    if missing:
        wrapped = ", ".join(target for target in targets if target not in missing)
        progress(f"warning: the base has no {', '.join(missing)}; LoRA wraps only {wrapped}")


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter (B = 0, so it starts as the base)."""
    targets: str | list[str] = (
        "all-linear" if list(settings.target_modules) == ["all-linear"] else list(settings.target_modules)
    )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _file_record(path: Path, samples: int) -> dict[str, object]:
    return {"path": str(path.resolve()), "samples": samples, "sha256": artifacts.sha256_file(path)}


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return trainable, sum(parameter.numel() for parameter in model.parameters())


def _prepare_device(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault(*CUBLAS_DETERMINISM)


def train_lora(
    base_dir: Path,
    data_path: Path,
    out_dir: Path,
    config: TrainConfig,
    lora: LoraSettings = LoraSettings(),
    validation_path: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    reasoning: ReasoningMode = "inline",
    force: bool = False,
    progress: Progress | None = None,
    auto_warmup: bool = False,
    checkpoint_every: int = 0,
) -> TrainLoraResult:
    """Fine-tune a LoRA adapter of `base_dir` on `data_path`; write it and `training.json` to `out_dir`.

    `auto_warmup` replaces `config.warmup_steps` by `default_warmup_steps` of the run's steps.
    `checkpoint_every` > 0 saves a checkpoint that often (see `checkpoint_path`) and resumes a
    matching one left by a run that was stopped.
    Raises `TrainLoraError`, `DatasetError` or `TrainingError` with a message that says what to fix;
    nothing is written to `out_dir` unless training finished.
    """
    progress = progress or stderr_progress("train-lora")
    with artifacts.quiet_transformers_progress():
        return _train_lora(
            Path(base_dir).resolve(),
            Path(data_path),
            Path(out_dir).resolve(),
            config,
            lora,
            None if validation_path is None else Path(validation_path),
            device,
            dtype,
            reasoning,
            force,
            progress,
            auto_warmup,
            checkpoint_every,
        )


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run writing `out_dir` keeps its checkpoint: a hidden file beside it."""
    return out_dir.parent / f".{out_dir.name}.checkpoint.pt"


def _train_lora(
    base_dir: Path,
    data_path: Path,
    out_dir: Path,
    config: TrainConfig,
    lora: LoraSettings,
    validation_path: Path | None,
    device_name: str,
    dtype_name: str,
    reasoning: ReasoningMode,
    force: bool,
    progress: Progress,
    auto_warmup: bool,
    checkpoint_every: int,
) -> TrainLoraResult:
    started_s = time.monotonic()
    torch_device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, torch_device)
    check_targets(check_base(base_dir), lora.target_modules, base_dir, progress)
    try:
        merge.check_output_dir(out_dir, force, (base_dir,))
    except MergeError as error:
        raise TrainLoraError(str(error)) from None
    tokenizer = load_tokenizer(base_dir)
    samples, changed = load_samples(data_path, reasoning)
    validation, _ = (None, 0) if validation_path is None else load_samples(validation_path, reasoning)
    if changed and reasoning == "inline":
        progress(f'put the "reasoning" field into the answer of {changed} samples')
    elif changed:
        progress(f"cut <think>…</think> out of the answers of {changed} samples (--reasoning drop)")
    if template_drops_reasoning(tokenizer, samples):
        progress(
            "warning: the base's chat template leaves <think>…</think> out of assistant turns, so the "
            "reasoning is not trained; give the base a template that keeps it to distil the reasoning"
        )
    if auto_warmup:
        config = replace(config, warmup_steps=default_warmup_steps(total_steps(config, len(samples))))

    _prepare_device(torch_device)
    where = f"{torch_device.type} ({artifacts.device_name(torch_device)})"
    progress(f"loading base from {base_dir} onto {where} in {dtype}")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=DTYPES[dtype]).to(torch_device)  # type: ignore[arg-type]  # transformers types .to() by its decorator, which takes a model
    torch.manual_seed(config.seed)
    model = attach_lora(base, lora)
    trainable, total = _parameter_counts(model)
    progress(f"LoRA r={lora.r} alpha={lora.alpha}: {trainable:,} trainable of {total:,} parameters")

    before = after = None
    if validation is not None:
        before = evaluate_loss(model, tokenizer, validation, config.max_length, config.batch_size)
        progress(f"validation loss before training: {before:.4f} nats/token on {len(validation)} samples")
    base_digests = merge.weight_digests(base_dir)
    checkpointing = None
    if checkpoint_every:
        fingerprint = {
            "base_weights_sha256": base_digests,
            "data_sha256": artifacts.sha256_file(data_path),
            "reasoning": reasoning,
            "lora": asdict(lora),
            "config": asdict(config),
            "device": torch_device.type,
            "dtype": dtype,
        }
        checkpointing = Checkpointing(checkpoint_path(out_dir), checkpoint_every, fingerprint)
    result = train_causal_lm(
        model, tokenizer, samples, config, progress, phase="LoRA training", checkpointing=checkpointing
    )
    if validation is not None:
        after = evaluate_loss(model, tokenizer, validation, config.max_length, config.batch_size)
        progress(f"validation loss after training: {after:.4f} nats/token")

    record: dict[str, object] = {
        "format": TRAINING_RECORD_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": str(base_dir),
        "base_weights_sha256": base_digests,
        "data": _file_record(data_path, len(samples)),
        "validation": None
        if validation is None or validation_path is None
        else _file_record(validation_path, len(validation)),
        "reasoning": {
            "mode": reasoning,
            "inlined_samples": changed if reasoning == "inline" else 0,
            "dropped_samples": changed if reasoning == "drop" else 0,
        },
        "lora": {**asdict(lora), "target_modules": list(lora.target_modules)},
        "config": asdict(config),
        "device": torch_device.type,
        "device_name": artifacts.device_name(torch_device),
        "machine": artifacts.machine_description(),
        "dtype": dtype,
        "parameters": {"trainable": trainable, "total": total},
        "loss_unit": "mean cross-entropy per assistant token, nats",
        "train": asdict(result),
        "validation_loss": None if validation is None else {"before": before, "after": after},
        "versions": artifacts.library_versions(),
    }
    return _save(model, tokenizer, out_dir, record, started_s, progress)


def _save(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    record: dict[str, object],
    started_s: float,
    progress: Progress,
) -> TrainLoraResult:
    """Write adapter, tokenizer and record into a staging directory, then rename it to `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = artifacts.staging_dir(out_dir.parent, out_dir.name, "tmp")
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        record["elapsed_s"] = round(time.monotonic() - started_s, 3)
        artifacts.write_json(record, staging / TRAINING_RECORD)
        artifacts.replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote the adapter to {out_dir} ({record['elapsed_s']:.1f} s)")
    progress(f"next: student merge --base {record['base']} --adapter {out_dir} --out MERGED_DIR")
    return TrainLoraResult(out_dir, record)


def _target_list(text: str) -> tuple[str, ...]:
    targets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not targets:
        raise argparse.ArgumentTypeError("give at least one module name")
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student train-lora`."""
    add = parser.add_argument
    add("--base", type=Path, required=True, metavar="DIR", help="base model (transformers save_pretrained)")
    add("--data", type=Path, required=True, metavar="FILE", help="training chats, JSONL (e.g. train.jsonl)")
    add("--validation", type=Path, metavar="FILE", help="validation chats, JSONL: loss before and after")
    add("--out", type=Path, required=True, metavar="DIR", help="adapter directory (must be new or empty)")
    add("--r", type=positive_int, default=LoraSettings.r, help="LoRA rank (default: %(default)s)")
    add("--alpha", type=positive_int, default=32, help="LoRA alpha; scales by alpha/r (default: 32)")
    add("--dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    add(
        "--target-modules",
        type=_target_list,
        default=LORA_TARGETS,
        metavar="NAMES",
        help=f"comma-separated module names to wrap, or all-linear (default: {','.join(LORA_TARGETS)})",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=positive_float, help="passes over the data (default: 1)")
    add("--lr", type=positive_float, default=2e-4, help="peak AdamW learning rate (default: %(default)s)")
    add("--batch-size", type=positive_int, default=8, help="chats per step (default: %(default)s)")
    add("--max-length", type=positive_int, default=1024, help="tokens per chat, cut beyond (default: 1024)")
    add("--warmup-steps", type=int, help="linear warm-up, then cosine decay (default: steps/10, at most 10)")
    add("--log-every", type=positive_int, default=10, help="steps per progress line (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the adapter's init and the data order (default: 0)")
    add("--device", choices=DEVICES, default="auto", help="auto (default): cuda when available, else cpu")
    add(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="base weights while training; auto: bfloat16 on a GPU that has it, else float32",
    )
    add(
        "--reasoning",
        choices=("inline", "drop"),
        default="inline",
        help='a row\'s "reasoning" field: put it in the answer as <think>…</think> (default), or drop it '
        "and cut <think>…</think> out of the answers (train answers only)",
    )
    add(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="save the training state this often beside --out, and resume it when the same command runs "
        "again after a stop; 0: never (default: %(default)s)",
    )
    add("--force", action="store_true", help="replace --out if it already has files")


def default_warmup_steps(steps: int) -> int:
    """A tenth of the steps, at most 10."""
    return min(10, steps // 10)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The trainer's configuration from the command line (`--epochs 1` unless `--steps`)."""
    return TrainConfig(
        steps=args.steps,
        epochs=None if args.steps is not None else (args.epochs if args.epochs is not None else 1.0),
        learning_rate=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        warmup_steps=0 if args.warmup_steps is None else args.warmup_steps,
        log_every=args.log_every,
        loss_on="assistant",
    )


def run(args: argparse.Namespace) -> int:
    """`student train-lora`: print the adapter directory; 1 with a one-line error on failure."""
    try:
        result = train_lora(
            args.base,
            args.data,
            args.out,
            config_from_args(args),
            LoraSettings(args.r, args.alpha, args.dropout, tuple(args.target_modules)),
            validation_path=args.validation,
            device=args.device,
            dtype=args.dtype,
            reasoning=args.reasoning,
            force=args.force,
            auto_warmup=args.warmup_steps is None,
            checkpoint_every=max(0, args.checkpoint_every),
        )
    except (TrainLoraError, DatasetError, TrainingError, OSError) as error:
        print(f"student train-lora: error: {error}", file=sys.stderr)
        return 1
    print(result.out_dir)
    return 0
