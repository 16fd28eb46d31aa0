"""A small, deterministic causal-LM trainer for chat "messages" data on the CPU.

It is shared by the demo student build (base pretraining and LoRA training) and by anything that
fine-tunes a student on chat JSONL. It works on any transformers causal LM (a peft-wrapped one
too): only parameters with `requires_grad` are optimised, so LoRA training is just "pass the
PeftModel".

Loss masking: the chat template is rendered once for the whole conversation; each assistant turn's
character span is located by rendering the conversation up to that turn (with and without the
turn), and tokens starting inside a span are labelled, everything else gets -100. The span includes
the template's end-of-turn marker, so the model learns to stop. This needs no `{% generation %}`
markers in the template, only that a rendered prefix of the conversation is a prefix of the full
rendering, which holds for ChatML, Llama and Qwen templates.

Determinism: the data order comes from a seeded `torch.Generator`, the weights' random state from
`torch.manual_seed`, and `torch.use_deterministic_algorithms(True)` is on during training. Matmul
reductions on the CPU still depend on the number of intra-op threads, so callers that need
bit-identical weights across runs must also fix `torch.set_num_threads` (the demo builder does).

Checkpoints (`Checkpointing`): every so many steps the trainable weights, the optimiser and
schedule state, the RNG state and the losses so far are saved to one file, replaced atomically.
A run started again with the same fingerprint (what the run is: data, base, settings) resumes
from it: the batch order is a pure function of the seed, so the batches already done are skipped
and the rest is what an uninterrupted run would have done, bit for bit on the CPU with a fixed
thread count. A checkpoint with another fingerprint is refused rather than silently mixed in.

Devices: batches go to the device of the model's parameters, so a model moved to a GPU trains
there. On a GPU the deterministic mode only warns where an operation has no deterministic kernel
(bit-identical GPU runs are not promised; set `CUBLAS_WORKSPACE_CONFIG=:4096:8` for cuBLAS).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from models.chat_data import ChatSample

IGNORE_INDEX = -100

Progress = Callable[[str], None]
LossOn = Literal["assistant", "all"]


class TrainingError(RuntimeError):
    """Training cannot start or went wrong (e.g. no tokens to learn from, loss became NaN)."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; `steps` are optimiser steps, `epochs` passes over the samples.

    Exactly one of `steps` and `epochs` is used: `steps` wins when both are set. The learning rate
    warms up linearly over `warmup_steps`, then decays on a cosine to `min_lr_ratio` of its peak.
    `max_length` is in tokens; longer conversations are cut on the right.
    """

    steps: int | None = None
    epochs: float | None = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    max_length: int = 256
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 20
    loss_on: LossOn = "assistant"


@dataclass(frozen=True)
class TrainResult:
    """Losses are mean token cross-entropy (nats); `final_loss` averages the last logging window.

    `elapsed_s` adds up every run of a resumed training; `resumed_from_step` is 0 when it ran in
    one go.
    """

    steps: int
    first_loss: float
    final_loss: float
    mean_loss: float
    samples: int
    tokens_per_step: float
    elapsed_s: float
    losses: tuple[float, ...] = ()
    resumed_from_step: int = 0


@dataclass(frozen=True)
class Checkpointing:
    """Save the training state to `path` every `every` steps, and resume from it when it is there.

    `fingerprint` says what the run is (plain JSON values: data and base digests, settings); a
    checkpoint saved under another fingerprint raises `TrainingError` instead of resuming.
    """

    path: Path
    every: int
    fingerprint: Mapping[str, Any] = field(default_factory=dict)


CHECKPOINT_FORMAT = "student-train-checkpoint/1"


@dataclass(frozen=True)
class EncodedSample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def stderr_progress(prefix: str) -> Progress:
    """A progress callback printing `[prefix] message` lines to stderr."""

    def report(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return report


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(rendered, str)  # tokenize=False renders text
    return rendered


def assistant_spans(tokenizer: PreTrainedTokenizerBase, sample: ChatSample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    messages = sample.as_dicts()
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TrainingError(
                "the tokenizer's chat template does not render conversations prefix by prefix, "
                "so assistant turns cannot be located for loss masking"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, sample: ChatSample, max_length: int, loss_on: LossOn = "assistant"
) -> EncodedSample:
    """Token ids and labels (-100 outside the trained part), cut to `max_length` tokens."""
    if not tokenizer.is_fast:
        raise TrainingError("loss masking needs a fast (Rust) tokenizer: it maps tokens to characters")
    text, spans = assistant_spans(tokenizer, sample)
    encoding = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    input_ids = encoding["input_ids"]
    labels = []
    for token_id, (start, _end) in zip(input_ids, encoding["offset_mapping"], strict=True):
        trained = loss_on == "all" or any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token_id if trained else IGNORE_INDEX)
    return EncodedSample(tuple(input_ids), tuple(labels))


def encode_samples(
    tokenizer: PreTrainedTokenizerBase, samples: Sequence[ChatSample], max_length: int, loss_on: LossOn
) -> list[EncodedSample]:
    """Encode all samples, dropping those with fewer than two tokens or no trained token."""
    encoded = (encode_sample(tokenizer, sample, max_length, loss_on) for sample in samples)
    kept = [
        item for item in encoded if len(item.input_ids) > 1 and any(label != IGNORE_INDEX for label in item.labels[1:])
    ]
    if not kept:
        raise TrainingError(f"none of the {len(samples)} samples has an assistant token within {max_length} tokens")
    return kept


def collate(batch: Sequence[EncodedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: pad ids in `input_ids`, 0 in `attention_mask`, -100 in `labels`."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item.input_ids)
        input_ids[row, :length] = torch.tensor(item.input_ids)
        labels[row, :length] = torch.tensor(item.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(sample_count: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of indices: seeded reshuffle each epoch, no batch straddles two epochs."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < steps:
        order = torch.randperm(sample_count, generator=generator).tolist()
        for start in range(0, sample_count, batch_size):
            if produced == steps:
                return
            yield order[start : start + batch_size]
            produced += 1


def total_steps(config: TrainConfig, sample_count: int) -> int:
    """Optimiser steps implied by `config` for `sample_count` samples (at least one)."""
    if config.steps is not None:
        return max(1, config.steps)
    if config.epochs is None:
        raise TrainingError("set either steps or epochs")
    return max(1, math.ceil(config.epochs * math.ceil(sample_count / config.batch_size)))


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for 0-based `step`: linear warm-up then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def deterministic_algorithms(warn_only: bool = False) -> Iterator[None]:
    """Turn on `torch.use_deterministic_algorithms` for the block, restoring the previous mode.

    `warn_only` makes an operation without a deterministic implementation warn instead of raise.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (the first parameter's device)."""
    return next(model.parameters()).device


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise TrainingError("the tokenizer has neither a pad token nor an end-of-sequence token")
    return pad_token_id


def _optimiser(
    parameters: list[torch.nn.Parameter], config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with the warm-up + cosine schedule of `lr_factor`."""
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, config.warmup_steps, config.min_lr_ratio)
    )
    return optimizer, schedule


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[ChatSample],
    config: TrainConfig,
    progress: Progress | None = None,
    phase: str = "training",
    on_step: Callable[[int, float], None] | None = None,
    checkpointing: Checkpointing | None = None,
) -> TrainResult:
    """Train `model` in place with AdamW on `samples` and return its losses.

    Progress lines look like "`phase` step 120/400 loss 2.31" every `config.log_every` steps.
    `on_step(step, loss)`, when given, receives every step's loss (1-based step) of this run.
    With `checkpointing`, a matching checkpoint is resumed and a new one saved every so often;
    it is deleted once training has finished.
    """
    progress = progress or stderr_progress("train")
    started_s = time.monotonic()
    encoded = encode_samples(tokenizer, samples, config.max_length, config.loss_on)
    steps = total_steps(config, len(encoded))
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    parameters = [parameter for _, parameter in named]
    if not parameters:
        raise TrainingError("the model has no trainable parameters")
    pad_token_id = _pad_token_id(tokenizer)
    device = model_device(model)
    torch.manual_seed(config.seed)
    optimizer, schedule = _optimiser(parameters, config, steps)
    losses: list[float] = []
    tokens, earlier_s, done = 0, 0.0, 0
    if checkpointing is not None:
        resumed = load_checkpoint(checkpointing, dict(named), optimizer, schedule)
        if resumed is not None:
            done, losses, tokens, earlier_s = resumed
            progress(f"{phase}: resuming at step {done + 1}/{steps} from {checkpointing.path}")
    progress(f"{phase}: {len(encoded)} samples, {steps} steps of batch {config.batch_size}")
    model.train()
    with deterministic_algorithms(warn_only=device.type != "cpu"):
        order = batch_order(len(encoded), config.batch_size, steps, config.seed)
        for step, indices in enumerate(order, start=1):
            if step <= done:
                continue
            batch = _to_device(collate([encoded[index] for index in indices], pad_token_id), device)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingError(f"{phase}: loss became {loss.item()} at step {step}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
            tokens += int(batch["attention_mask"].sum())
            if step % config.log_every == 0 or step == steps:
                window = losses[-config.log_every :]
                progress(f"{phase} step {step}/{steps} loss {sum(window) / len(window):.2f}")
            if checkpointing is not None and step % checkpointing.every == 0 and step < steps:
                elapsed_s = earlier_s + time.monotonic() - started_s
                save_checkpoint(checkpointing, step, losses, tokens, elapsed_s, dict(named), optimizer, schedule)
                progress(f"{phase}: checkpoint saved at step {step}")
    model.eval()
    if checkpointing is not None:
        checkpointing.path.unlink(missing_ok=True)
    window = losses[-config.log_every :]
    return TrainResult(
        steps=steps,
        first_loss=losses[0],
        final_loss=sum(window) / len(window),
        mean_loss=sum(losses) / len(losses),
        samples=len(encoded),
        tokens_per_step=tokens / steps,
        elapsed_s=earlier_s + time.monotonic() - started_s,
        losses=tuple(losses),
        resumed_from_step=done,
    )


def save_checkpoint(
    checkpointing: Checkpointing,
    step: int,
    losses: Sequence[float],
    tokens: int,
    elapsed_s: float,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Write the state after `step` to a temporary file and rename it over the checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": json.dumps(checkpointing.fingerprint, sort_keys=True),
        "step": step,
        "losses": list(losses),
        "tokens": tokens,
        "elapsed_s": elapsed_s,
        "trainable": {name: parameter.detach().cpu() for name, parameter in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
    }
    path = checkpointing.path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(
    checkpointing: Checkpointing,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, list[float], int, float] | None:
    """Restore a matching checkpoint into the model, optimiser and schedule; its step, losses,
    tokens and elapsed seconds. None when there is none."""
    path = checkpointing.path
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        matches = state["format"] == CHECKPOINT_FORMAT and state["fingerprint"] == json.dumps(
            checkpointing.fingerprint, sort_keys=True
        )
    except Exception as error:  # a torn or foreign file: torch raises many kinds
        raise TrainingError(f"cannot read the checkpoint {path} ({error}); delete it to start afresh") from None
    if not matches:
        raise TrainingError(
            f"the checkpoint {path} belongs to another run (different data, base or settings); "
            "delete it to start afresh, or run with the same inputs to resume it"
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return state["step"], list(state["losses"]), state["tokens"], state["elapsed_s"]


def evaluate_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[ChatSample],
    max_length: int,
    batch_size: int,
) -> float:
    """Mean cross-entropy (nats) per assistant token of `samples`, in the data's order.

    The same encoding and masking as training (assistant turns with their end marker, cut to
    `max_length`), but every labelled token weighs the same whatever its batch; computed in
    float32 without gradients. The model's train/eval mode is restored afterwards.
    """
    encoded = encode_samples(tokenizer, samples, max_length, "assistant")
    pad_token_id = _pad_token_id(tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                batch = _to_device(collate(encoded[start : start + batch_size], pad_token_id), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                for row in range(len(targets)):  # one row at a time: float32 logits of a big vocabulary
                    total_nats += float(
                        torch.nn.functional.cross_entropy(
                            logits[row, :-1].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum"
                        )
                    )
                total_tokens += int(targets.ne(IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total_nats / total_tokens
