"""`student demo-model`: build the embedded demo student offline, deterministically, and cache it.

Nothing can be downloaded here, so the default student is made from the bundled dataset in about
a minute and a half on one CPU thread (80-90 s measured on the project's 2-core machine):

1. a byte-level BPE tokenizer trained on the dataset text (`models.tokenizer.train_tokenizer`); the
   vocabulary is capped at 2048 but the bundled text saturates at about 1.3k tokens, when every
   word has become a single token;
2. a small Llama base (head_dim 64, which vLLM's CPU attention needs) pretrained with
   `models.train` on the chats of some topics only (loss on every token);
3. a LoRA adapter trained with peft on all topics (loss on assistant turns only), so the adapter
   visibly teaches the topics the base never saw;
4. the merge through `models.merge.merge_adapter`, the same code path, verification and manifest as
   `student merge`.

The result is a plain transformers model directory that vLLM serves with `--model DIR`; the merge
inputs are kept under `DIR/build/` (vLLM only reads weight files at the top level).

Caching: the build lands in `cache_dir/demo-student-<key>/`, where the key hashes every input (the
dataset and prompt bytes, the settings, the source of the modules that build it, library
versions). A build writes into a temporary directory beside it and renames it into place at the
end, so an interrupted build is never taken for a complete one.

Threads and determinism: seeds fix the initial weights and the data order, and the build runs with
a fixed number of torch threads (`DemoSettings.threads`) because the CPU matmul kernels split their
reductions by thread, so the summation order and hence the last bits of every weight depend on the
thread count. With it fixed, two builds with the same library versions give bit-identical weights
whatever the machine's core count. The count is 1: the matrices are small (256 wide), and when
another process (a vLLM server, a test run) competes for the two cores, OpenMP's spinning barriers
make two threads about 3.5x slower than one (measured 0.82 s versus 0.23 s per training step).
The caller's thread count and RNG state are restored afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from models import artifacts, merge, tiny, train
from models import tokenizer as tokenizer_module
from models.merge import MergeError, merge_adapter
from models.tiny import llama_config, save_model
from models.tokenizer import train_tokenizer
from models.train import (
    ChatSample,
    DatasetError,
    Progress,
    TrainConfig,
    TrainingError,
    TrainResult,
    load_chat_jsonl,
    train_causal_lm,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
DATASET_FILE = DATA_DIR / "support_chats.jsonl"
PROMPTS_FILE = DATA_DIR / "demo_prompts.jsonl"
BUILD_INFO_NAME = "demo-build.json"
BUILD_INFO_FORMAT = "student-demo-build/1"
CACHE_ENV = "STUDENT_CACHE_DIR"
DIR_PREFIX = "demo-student-"
KEY_CHARS = 12
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DemoError(Exception):
    """The demo student cannot be built or stored as asked; the message says why.

    Failures inside the build (dataset, training, merge verification) arrive wrapped in it, so
    callers such as `student serve` catch this one class.
    """


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes the demo student; part of the cache key.

    Steps are optimiser steps of `batch_size` chats; learning rates are AdamW peak rates;
    `max_length` and `max_new_tokens` are in tokens. `base_topics` are the topics the base is
    pretrained on; the LoRA adapter is trained on all of them.
    """

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    num_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    base_topics: tuple[str, ...] = ("discount_code", "late_delivery", "order_tracking", "payment_methods")
    base_steps: int = 200
    base_learning_rate: float = 3e-3
    lora_steps: int = 200
    lora_learning_rate: float = 3e-3
    lora_r: int = 16
    lora_alpha: int = 32
    batch_size: int = 16
    max_length: int = 256
    dtype: str = "float32"
    threads: int = 1
    max_new_tokens: int = 128
    log_every: int = 50


@dataclass(frozen=True)
class Answer:
    topic: str | None
    question: str
    answer: str


def stderr_progress(prefix: str = "demo") -> Progress:
    """A progress callback printing `[prefix] message` lines to stderr."""
    return train.stderr_progress(prefix)


def default_cache_dir() -> Path:
    """`$STUDENT_CACHE_DIR`, else `~/.cache/student-serve`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "student-serve"


def cache_key(settings: DemoSettings = DemoSettings()) -> str:
    """Hex sha256 over the build's inputs: data, prompts, settings, builder source, versions."""
    digest = hashlib.sha256()
    for path in (DATASET_FILE, PROMPTS_FILE):
        digest.update(path.read_bytes())
    for module in (sys.modules[__name__], train, tokenizer_module, tiny, merge):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    digest.update(json.dumps(artifacts.library_versions(), sort_keys=True).encode())
    return digest.hexdigest()


def cache_dir_name(settings: DemoSettings = DemoSettings()) -> str:
    return f"{DIR_PREFIX}{cache_key(settings)[:KEY_CHARS]}"


@contextmanager
def build_environment(threads: int) -> Iterator[None]:
    """Fixed torch thread count, private RNG state, no transformers progress bars; all restored after."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]), artifacts.quiet_transformers_progress():
            yield
    finally:
        torch.set_num_threads(previous_threads)


def read_build_info(model_dir: Path) -> dict[str, object] | None:
    """The demo build record in `model_dir`, or None when there is none or it is unreadable."""
    try:
        info = json.loads((model_dir / BUILD_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(model_dir: Path, key: str) -> bool:
    """True when `model_dir` holds a finished, verified build for cache key `key`."""
    info = read_build_info(model_dir)
    if info is None or info.get("cache_key") != key:
        return False
    try:
        manifest = json.loads((model_dir / merge.MANIFEST_NAME).read_text(encoding="utf-8"))
        passed = manifest["verification"]["passed"] is True
        weights = list(manifest["weights"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return passed and bool(weights) and all((model_dir / name).is_file() for name in weights)


def train_demo_tokenizer(samples: Sequence[ChatSample], vocab_size: int) -> PreTrainedTokenizerBase:
    """BPE over each message as "role\\ncontent", so the chat template's role names get tokens too."""
    texts = [f"{message.role}\n{message.content}" for sample in samples for message in sample.messages]
    return train_tokenizer(texts, vocab_size)


def _train_config(settings: DemoSettings, lora: bool) -> TrainConfig:
    """Base pretraining learns every token; LoRA training only the assistant turns."""
    steps = settings.lora_steps if lora else settings.base_steps
    return TrainConfig(
        steps=steps,
        learning_rate=settings.lora_learning_rate if lora else settings.base_learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed + 1 if lora else settings.seed,
        max_length=settings.max_length,
        warmup_steps=min(10, steps),
        log_every=settings.log_every,
        loss_on="assistant" if lora else "all",
    )


def build_base(
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[ChatSample],
    settings: DemoSettings,
    out_dir: Path,
    progress: Progress,
) -> tuple[LlamaForCausalLM, TrainResult]:
    """Pretrain a fresh Llama on the `base_topics` chats (every token) and save it to `out_dir`."""
    torch.manual_seed(settings.seed)
    config = llama_config(
        tokenizer,  # type: ignore[arg-type]
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
    )
    model = LlamaForCausalLM(config)
    base_samples = [sample for sample in samples if sample.topic in settings.base_topics]
    if not base_samples:
        raise DemoError(f"no samples in the dataset have the base topics {settings.base_topics}")
    parameters_m = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    shape = f"{settings.num_layers} layers, hidden {settings.hidden_size}"
    progress(f"base: Llama {shape}, {parameters_m:.1f}M parameters")
    train_config = _train_config(settings, lora=False)
    result = train_causal_lm(model, tokenizer, base_samples, train_config, progress, phase="base pretraining")
    save_model(model, tokenizer, out_dir)  # type: ignore[arg-type]
    return model, result


def build_adapter(
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[ChatSample],
    settings: DemoSettings,
    out_dir: Path,
    progress: Progress,
) -> TrainResult:
    """Train a LoRA adapter on all chats (assistant turns only); save it with its tokenizer."""
    torch.manual_seed(settings.seed + 1)
    lora_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    train_config = _train_config(settings, lora=True)
    result = train_causal_lm(model, tokenizer, samples, train_config, progress, phase="LoRA training")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return result


def greedy_answers(model_dir: Path, prompts: Sequence[ChatSample], max_new_tokens: int) -> list[Answer]:
    """Greedy replies of the model in `model_dir` to each prompt, through its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt.as_dicts(), tokenize=False, add_generation_prompt=True)
        input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            output = model.generate(  # type: ignore[misc]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        reply = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()  # type: ignore[union-attr]
        answers.append(Answer(prompt.topic, prompt.messages[-1].content, reply))
    return answers


def _relocate_manifest(model_dir: Path, inputs: dict[str, Path]) -> None:
    """Point the merge manifest's input paths at where the inputs live after the final rename."""
    path = model_dir / merge.MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for section, location in inputs.items():
        manifest[section]["path"] = str(location)
    artifacts.write_json(manifest, path)


def _build_into(staging: Path, target: Path, key: str, settings: DemoSettings, progress: Progress) -> Path:
    """Run the whole build inside `staging`; return the finished model directory within it."""
    started_s = time.monotonic()
    timings_s: dict[str, float] = {}
    samples = load_chat_jsonl(DATASET_FILE)
    prompts = load_chat_jsonl(PROMPTS_FILE)

    tokenizer = train_demo_tokenizer(samples, settings.vocab_size)
    progress(f"tokenizer: {len(tokenizer)} tokens from {len(samples)} chats")
    timings_s["tokenizer"] = time.monotonic() - started_s

    phase_s = time.monotonic()
    base, base_result = build_base(tokenizer, samples, settings, staging / "base", progress)
    timings_s["base"] = time.monotonic() - phase_s

    phase_s = time.monotonic()
    lora_result = build_adapter(base, tokenizer, samples, settings, staging / "adapter", progress)
    timings_s["lora"] = time.monotonic() - phase_s
    del base

    phase_s = time.monotonic()
    model_dir = staging / "student"
    merge_result = merge_adapter(
        staging / "base",
        staging / "adapter",
        model_dir,
        dtype=settings.dtype,
        progress=lambda message: progress(f"merge: {message}"),
    )
    timings_s["merge"] = time.monotonic() - phase_s

    phase_s = time.monotonic()
    answers = greedy_answers(model_dir, prompts, settings.max_new_tokens)
    timings_s["answers"] = time.monotonic() - phase_s
    for answer in answers:
        progress(f"Q: {answer.question}")
        progress(f"A: {answer.answer}")

    build_dir = model_dir / "build"
    build_dir.mkdir()
    for part in ("base", "adapter"):
        os.rename(staging / part, build_dir / part)
    _relocate_manifest(model_dir, {part: target / "build" / part for part in ("base", "adapter")})
    timings_s["total"] = time.monotonic() - started_s
    info = {
        "format": BUILD_INFO_FORMAT,
        "cache_key": key,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings_s": {name: round(value, 1) for name, value in timings_s.items()},
        "settings": asdict(settings),
        "versions": artifacts.library_versions(),
        "vocab_size": len(tokenizer),
        "base_training": asdict(base_result),
        "lora_training": asdict(lora_result),
        "merge_max_abs_diff": merge_result.verification.max_abs_diff,
        "weights_sha256": dict(merge_result.weight_sha256),
        "answers": [asdict(answer) for answer in answers],
    }
    artifacts.write_json(info, model_dir / BUILD_INFO_NAME)
    return model_dir


def _check_target(target: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory that is not an earlier demo build, unless forced."""
    if target.exists() and not target.is_dir():
        raise DemoError(f"{target} exists and is not a directory")
    if force or not target.is_dir() or not any(target.iterdir()) or read_build_info(target) is not None:
        return
    raise DemoError(f"{target} already exists, is not empty and is not a demo student; pass --force to replace it")


def _materialise(target: Path, settings: DemoSettings, progress: Progress, rebuild: bool) -> Path:
    """Build into a staging directory beside `target` and rename it into place, unless up to date."""
    key = cache_key(settings)
    if not rebuild and is_complete(target, key):
        progress(f"cache hit: {target} is up to date (key {key[:KEY_CHARS]})")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started_s = time.monotonic()
    progress(f"building the demo student into {target} (key {key[:KEY_CHARS]})")
    staging = artifacts.staging_dir(target.parent, target.name, "tmp")
    try:
        with build_environment(settings.threads):
            model_dir = _build_into(staging, target, key, settings, progress)
        if not rebuild and is_complete(target, key):
            progress(f"another build finished {target} first; keeping it")
            return target
        artifacts.replace_dir(model_dir, target)
    except (MergeError, DatasetError, TrainingError) as error:
        raise DemoError(f"building the demo student failed: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"demo student ready in {target} ({time.monotonic() - started_s:.0f} s)")
    return target


def build_demo_student(
    out_dir: Path,
    settings: DemoSettings = DemoSettings(),
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Make `out_dir` (chosen by the user) hold the demo student; return it, the model directory.

    An up-to-date build there is reused and an earlier demo build for other inputs is replaced;
    any other non-empty directory is only replaced with `force`, which also forces a rebuild.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir, force)
    return _materialise(out_dir, settings, progress or stderr_progress(), rebuild=force)


def ensure_demo_student(
    cache_dir: Path,
    progress: Progress | None = None,
    settings: DemoSettings = DemoSettings(),
    force: bool = False,
) -> Path:
    """The merged demo student in `cache_dir/demo-student-<key>/`, built only if missing.

    The keyed directory belongs to the cache: anything there that is not a complete build for
    this key (a leftover from a crashed older version, say) is replaced. `force` rebuilds anyway.
    """
    target = Path(cache_dir).expanduser().resolve() / cache_dir_name(settings)
    if target.exists() and not target.is_dir():
        raise DemoError(f"{target} exists and is not a directory")
    return _materialise(target, settings, progress or stderr_progress(), rebuild=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student demo-model`."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for the demo student (default: ${CACHE_ENV} or ~/.cache/student-serve, in {DIR_PREFIX}<key>/)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")


def run(args: argparse.Namespace, settings: DemoSettings = DemoSettings()) -> int:
    """`student demo-model`: print the model directory on stdout; 1 with a one-line error on failure."""
    try:
        if args.out is None:
            model_dir = ensure_demo_student(default_cache_dir(), settings=settings, force=args.force)
        else:
            model_dir = build_demo_student(args.out, settings, force=args.force)
    except (DemoError, OSError) as error:
        print(f"student demo-model: error: {error}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0
