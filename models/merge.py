"""`student merge`: fold a LoRA adapter into its base model, verify the result, write a manifest.

The output directory is a plain transformers model (safetensors weights, tokenizer, chat template,
generation config) that vLLM loads directly with `--model OUT`, so serving needs no peft at all.

Verification: the reference is the base in float32 with the adapter applied unmerged (a peft
`PeftModel`), the ground truth of what the adapter means. The merged model is reloaded from the
written files in the requested dtype and run on the same chat-formatted Vietnamese support prompts;
the largest absolute logit difference must stay under

    tolerance = atol + rtol * max|reference logit|

with (atol, rtol) chosen per dtype (see `TOLERANCES`). In float32 the only difference is the order
of floating-point operations (W + BA versus Wx + BAx); 1e-4 + 1e-4 * max|logit| leaves room for
deeper models while still failing on a missing scale factor or a skipped layer. bfloat16 keeps 8
mantissa bits (rounding 2^-9 per weight) and float16 11 bits (2^-12), and rounding every weight
moves the logits, hence 5% and 1% of the largest logit. Measured on the demo student (largest
logit 14.9, adapter effect 12.8): float32 6.8e-6 against a tolerance of 1.6e-3, bfloat16 0.087
against 0.79, float16 0.011 against 0.16. Every tolerance stays far below the adapter's effect,
so a merge that silently dropped the adapter fails.

Device: `--device cpu` (the default) or `cuda` loads, merges and verifies on that device; the
reference and the reloaded merged model run on the same one, and the logits are compared on the
CPU. Asking for `cuda` where PyTorch sees no CUDA GPU is a `MergeError` that says why.

Writes are atomic: everything goes to a temporary directory beside `--out` that is renamed into
place only after verification passes. A failed verification leaves its output (with a manifest
saying `"passed": false`) in `OUT.rejected` for inspection, never at `OUT`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import cast

import safetensors
import torch
import transformers
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from models.artifacts import (
    DEVICES,
    ArtifactError,
    DeviceError,
    check_device,
    device_name,
    library_versions,
    quiet_transformers_progress,
    replace_dir,
    sha256_file,
    staging_dir,
    write_json,
)
from models.train import Progress, stderr_progress

MANIFEST_NAME = "student-manifest.json"
MANIFEST_FORMAT = "student-manifest/1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DTYPES = MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})
TOLERANCES = MappingProxyType({"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 5e-2), "float16": (1e-2, 1e-2)})
LORA_MARKERS = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")
WRAPPER_SEGMENTS = (".base_layer", ".modules_to_save", ".original_module")
PEFT_PREFIX = "base_model.model."

SYSTEM_PROMPT = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."
VERIFY_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Đơn hàng DH204518 của mình đang ở đâu rồi?"),),
    (("user", "Mình muốn trả lại tai nghe bluetooth đã mua được 12 ngày, có được không?"),),
    (("user", "Shop có nhận thanh toán bằng ví MoMo không?"),),
    (("user", "Máy sấy tóc bị vào nước thì có được bảo hành không?"),),
    (
        ("user", "Mình mua áo thun size M bị chật."),
        ("assistant", "Bạn có thể đổi sang size khác miễn phí một lần trong 30 ngày."),
        ("user", "Vậy đổi sang size L thì làm thế nào?"),
    ),
)


class MergeError(ArtifactError):
    """A merge that cannot be done as asked; the message says what to fix."""


class InputError(MergeError):
    """The --base or --adapter directory is missing, empty or not what it should be."""


class AdapterMismatchError(MergeError):
    """The adapter was not trained for this base (module names, vocabulary or sizes differ)."""


class OutputExistsError(MergeError):
    """--out already holds something and --force was not given."""


class VerificationError(MergeError):
    """The merged model's logits differ from base+adapter by more than the tolerance."""

    def __init__(self, message: str, result: MergeResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Verification:
    """Logit agreement of the reloaded merged model with the unmerged float32 base+adapter."""

    prompts: int
    max_abs_diff: float
    tolerance: float
    atol: float
    rtol: float
    max_abs_reference_logit: float
    adapter_effect_max_abs_diff: float
    passed: bool
    reference: str = "float32 base with the adapter applied unmerged (peft PeftModel)"


@dataclass(frozen=True)
class MergeResult:
    """Where the merge went and how it verified; `out_dir` is `OUT.rejected` when it failed."""

    out_dir: Path
    manifest_path: Path
    dtype: str
    verification: Verification
    weight_sha256: Mapping[str, str]
    elapsed_s: float
    device: str = "cpu"


def weight_files(model_dir: Path) -> list[Path]:
    """Weight files directly in `model_dir` (safetensors or pickled .bin shards), sorted by name."""
    return sorted(path for path in model_dir.iterdir() if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))


def weight_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of each weight file, keyed by file name."""
    return {path.name: sha256_file(path) for path in weight_files(model_dir)}


def check_input_dir(path: Path, what: str, required: Sequence[str], hint: str) -> None:
    """Raise `InputError` unless `path` is a non-empty directory holding one of `required`."""
    if not path.exists():
        raise InputError(f"the {what} directory {path} does not exist")
    if not path.is_dir():
        raise InputError(f"the {what} path {path} is not a directory")
    if not any(path.iterdir()):
        raise InputError(f"the {what} directory {path} is empty")
    if not any((path / name).is_file() for name in required):
        raise InputError(f"the {what} directory {path} has no {' or '.join(required)}: {hint}")


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents or path in other.parents


def check_output_dir(out_dir: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse an --out that overlaps an input, is a file, or is non-empty without `force`."""
    for input_dir in inputs:
        if _is_within(out_dir, input_dir):
            raise OutputExistsError(f"--out {out_dir} overlaps the input directory {input_dir}; choose a new directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"--out {out_dir} already exists and is not empty; pass --force to replace it")


def _peft_type_name(config: PeftConfig) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def read_lora_config(adapter_dir: Path) -> LoraConfig:
    """The adapter's peft config; only LoRA adapters are accepted."""
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as error:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG} is not a valid peft adapter config: {error}") from None
    if not isinstance(config, LoraConfig):
        raise InputError(
            f"the adapter in {adapter_dir} is of type {_peft_type_name(config)}; only LoRA adapters can be merged"
        )
    return config


def read_adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the adapter weights, without loading safetensors data."""
    for name in ADAPTER_WEIGHTS:
        path = adapter_dir / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            with safetensors.safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {key: tuple(tensor.shape) for key, tensor in state.items()}
    raise InputError(f"the adapter directory {adapter_dir} has no {' or '.join(ADAPTER_WEIGHTS)}")


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The base architecture on the meta device: module names and shapes, no memory for weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _module_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(input size, output size) a LoRA pair must match, or None for layer kinds not checked here."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":
        rows, columns = tuple(cast(torch.Tensor, module.weight).shape)
        return int(rows), int(columns)
    return None


def _expected_lora_shape(marker: str, dims: tuple[int, int], rank: int) -> tuple[int, ...] | None:
    in_size, out_size = dims
    return {
        ".lora_A": (rank, in_size),
        ".lora_B": (out_size, rank),
        ".lora_embedding_A": (rank, in_size),
        ".lora_embedding_B": (out_size, rank),
    }.get(marker)


def _strip_wrappers(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _describe_sizes(config: PretrainedConfig) -> str:
    return (
        f"the base has a vocabulary of {getattr(config, 'vocab_size', '?')} tokens, "
        f"hidden size {getattr(config, 'hidden_size', '?')}, "
        f"{getattr(config, 'num_hidden_layers', '?')} layers"
    )


def _mismatch_kind(expected: Sequence[int], actual: Sequence[int], config: PretrainedConfig) -> str:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab in expected and vocab not in actual:
        return "vocabulary size"
    return "hidden/layer sizes"


def check_target_modules(config: LoraConfig, model: PreTrainedModel) -> None:
    """Raise `AdapterMismatchError` when no base module matches the adapter's target_modules."""
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(config, name) for name in names):
        return
    linear_leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    targets = config.target_modules
    shown = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)
    raise AdapterMismatchError(
        f"the adapter targets modules {shown}, none of which exist in the base ({model.config.model_type}); "
        f"its linear layers are named {', '.join(linear_leaves)}. "
        "Was the adapter trained for another architecture?"
    )


def check_adapter_shapes(
    shapes: Mapping[str, tuple[int, ...]], model: PreTrainedModel, rank_of: Callable[[str], int]
) -> None:
    """Raise `AdapterMismatchError` for adapter tensors whose module is absent or sized differently."""
    modules = dict(model.named_modules())
    parameters = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    parameters.update({name: tuple(buffer.shape) for name, buffer in model.named_buffers()})
    problems: list[str] = []
    kinds: set[str] = set()
    for key, shape in sorted(shapes.items()):
        name = key.removeprefix(PEFT_PREFIX)
        marker = next((marker for marker in LORA_MARKERS if marker in name), None)
        if marker is None:
            target = _strip_wrappers(name)
            if target not in parameters:
                problems.append(f"{target}: not a parameter of the base")
            elif parameters[target] != shape:
                problems.append(f"{target}: adapter has shape {list(shape)}, base has {list(parameters[target])}")
                kinds.add(_mismatch_kind(parameters[target], shape, model.config))
            continue
        module_name = _strip_wrappers(name.split(marker, 1)[0])
        if module_name not in modules:
            problems.append(f"{module_name}: no such module in the base")
            continue
        dims = _module_dims(modules[module_name])
        expected = None if dims is None else _expected_lora_shape(marker, dims, rank_of(module_name))
        if expected is not None and expected != shape:
            problems.append(f"{module_name}{marker}: adapter has shape {list(shape)}, the base needs {list(expected)}")
            kinds.add(_mismatch_kind(expected, shape, model.config))
    if problems:
        listed = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        what = " and ".join(sorted(kinds)) if kinds else "module names"
        raise AdapterMismatchError(
            f"the adapter does not fit this base (different {what}; {_describe_sizes(model.config)}): "
            f"{listed}. Was it trained on a different base model?"
        )


def check_adapter_tokenizer(adapter_dir: Path, base_tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """If the adapter ships a tokenizer, it must be the base's (same tokens, same ids)."""
    if not any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        return
    adapter_tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if adapter_tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise AdapterMismatchError(
            f"the adapter's tokenizer ({len(adapter_tokenizer)} tokens) differs from the base's "
            f"({len(base_tokenizer)} tokens): the adapter was trained with another vocabulary, "
            "so its weights would be applied to the wrong tokens"
        )


def load_meta_base(base_dir: Path) -> PreTrainedModel:
    """The base's architecture without its weights; `InputError` if it is no causal LM."""
    try:
        return meta_model(AutoConfig.from_pretrained(str(base_dir)))
    except (ValueError, KeyError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"the base in {base_dir} is not a causal language model transformers can load: {reason}"
        ) from None


def check_adapter_fits(base_dir: Path, adapter_dir: Path, lora_config: LoraConfig) -> None:
    """Check module names and tensor shapes before peft would fail on them with a stack trace."""
    model = load_meta_base(base_dir)
    check_target_modules(lora_config, model)

    def rank_of(module_name: str) -> int:
        for pattern, rank in (lora_config.rank_pattern or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module_name):
                return rank
        return lora_config.r

    check_adapter_shapes(read_adapter_shapes(adapter_dir), model, rank_of)


def prompt_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """The verification conversations as token ids, through the chat template when there is one."""
    encoded = []
    for conversation in VERIFY_CONVERSATIONS:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages += [{"role": role, "content": content} for role, content in conversation]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(message["content"] for message in messages))["input_ids"]
        encoded.append(torch.tensor([ids], dtype=torch.long))
    return encoded


def prompt_logits(model: torch.nn.Module, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 logits for every position of every prompt, run on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in prompts]


def max_abs_diff(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right, strict=True))


def tolerance_for(dtype: str, max_abs_reference_logit: float, override: float | None) -> tuple[float, float, float]:
    """(tolerance, atol, rtol) for `dtype`; an explicit `override` replaces the computed tolerance."""
    atol, rtol = TOLERANCES[dtype]
    tolerance = atol + rtol * max_abs_reference_logit if override is None else override
    return tolerance, atol, rtol


def _lora_summary(config: LoraConfig) -> dict[str, object]:
    targets = config.target_modules
    return {
        "peft_type": _peft_type_name(config),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "modules_to_save": sorted(config.modules_to_save) if config.modules_to_save else None,
        "trained_on": config.base_model_name_or_path,
    }


def build_manifest(
    base_dir: Path,
    adapter_dir: Path,
    lora_config: LoraConfig,
    dtype: str,
    out_dir: Path,
    verification: Verification,
    weights: Mapping[str, str],
    elapsed_s: float,
    device: torch.device,
) -> dict[str, object]:
    """The provenance record written next to the merged weights (`weights`: file name -> sha256)."""
    return {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {"path": str(base_dir), "weights_sha256": weight_digests(base_dir)},
        "adapter": {
            "path": str(adapter_dir),
            "weights_sha256": weight_digests(adapter_dir),
            **_lora_summary(lora_config),
        },
        "dtype": dtype,
        "device": device.type,
        "device_name": device_name(device),
        "weights": {
            name: {"sha256": digest, "bytes": (out_dir / name).stat().st_size} for name, digest in weights.items()
        },
        "verification": asdict(verification),
        "versions": library_versions(),
        "elapsed_s": round(elapsed_s, 3),
    }


def save_merged(model: PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Weights as safetensors plus tokenizer, chat template and generation config."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "generation_config.json").is_file():
        transformers.GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(str(out_dir))


def _validate_inputs(
    base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, force: bool, device: str
) -> torch.device:
    if dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        torch_device = check_device(device)
    except DeviceError as error:
        raise MergeError(str(error)) from None
    check_input_dir(base_dir, "base", ("config.json",), "expected a model saved with save_pretrained")
    check_input_dir(base_dir, "base", TOKENIZER_FILES, "the merged model needs the base's tokenizer")
    check_input_dir(adapter_dir, "adapter", (ADAPTER_CONFIG,), "expected a peft adapter (save_pretrained)")
    check_output_dir(out_dir, force, (base_dir, adapter_dir))
    return torch_device


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
    tolerance: float | None = None,
    device: str = "cpu",
) -> MergeResult:
    """Merge `adapter_dir` into `base_dir`, save to `out_dir` in `dtype`, verify, write the manifest.

    `tolerance` (absolute, in logits) overrides the per-dtype default. `device` ("cpu" or
    "cuda") is where loading, merging and verification run. Raises a `MergeError` subclass for
    bad inputs or an unusable device, and `VerificationError` (carrying the result) when logits
    disagree.
    """
    progress = progress or stderr_progress("merge")
    with quiet_transformers_progress():
        return _merge(Path(base_dir), Path(adapter_dir), Path(out_dir), dtype, force, progress, tolerance, device)


def _merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    force: bool,
    progress: Progress,
    tolerance: float | None,
    device: str,
) -> MergeResult:
    started_s = time.monotonic()
    base_dir, adapter_dir, out_dir = base_dir.resolve(), adapter_dir.resolve(), out_dir.resolve()
    torch_device = _validate_inputs(base_dir, adapter_dir, out_dir, dtype, force, device)
    lora_config = read_lora_config(adapter_dir)
    progress(f"checking adapter {adapter_dir} against base {base_dir}")
    check_adapter_fits(base_dir, adapter_dir, lora_config)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    check_adapter_tokenizer(adapter_dir, tokenizer)
    prompts = prompt_ids(tokenizer)

    progress(f"loading base from {base_dir} onto {torch_device.type} ({device_name(torch_device)})")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(torch_device)  # type: ignore[arg-type]  # transformers types .to() by its decorator, which takes a model
    progress(f"applying adapter from {adapter_dir} (LoRA r={lora_config.r}, alpha={lora_config.lora_alpha})")
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.eval()
    reference = prompt_logits(peft_model, prompts)
    with peft_model.disable_adapter():
        base_only = prompt_logits(peft_model, prompts)
    progress("merging adapter into base weights")
    merged = peft_model.merge_and_unload().to(DTYPES[dtype])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_dir.parent, out_dir.name, "tmp")
    try:
        progress(f"saving {dtype} weights to {out_dir}")
        save_merged(merged, tokenizer, staging)
        del merged, peft_model, base
        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=DTYPES[dtype]).to(torch_device)  # type: ignore[arg-type]  # as above
        verification = _verify(reference, base_only, prompt_logits(reloaded, prompts), dtype, tolerance)
        progress(
            f"verified on {verification.prompts} prompts: max abs logit diff {verification.max_abs_diff:.3g} "
            f"(tolerance {verification.tolerance:.3g}, "
            f"adapter effect {verification.adapter_effect_max_abs_diff:.3g}) "
            f"{'passed' if verification.passed else 'FAILED'}"
        )
        return _finish(
            staging,
            base_dir,
            adapter_dir,
            out_dir,
            lora_config,
            dtype,
            verification,
            started_s,
            progress,
            torch_device,
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _verify(
    reference: Sequence[torch.Tensor],
    base_only: Sequence[torch.Tensor],
    merged: Sequence[torch.Tensor],
    dtype: str,
    tolerance_override: float | None,
) -> Verification:
    max_abs_reference_logit = max(float(logits.abs().max()) for logits in reference)
    tolerance, atol, rtol = tolerance_for(dtype, max_abs_reference_logit, tolerance_override)
    diff = max_abs_diff(reference, merged)
    return Verification(
        prompts=len(reference),
        max_abs_diff=diff,
        tolerance=tolerance,
        atol=atol,
        rtol=rtol,
        max_abs_reference_logit=max_abs_reference_logit,
        adapter_effect_max_abs_diff=max_abs_diff(reference, base_only),
        passed=diff <= tolerance,
    )


def _finish(
    staging: Path,
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    lora_config: LoraConfig,
    dtype: str,
    verification: Verification,
    started_s: float,
    progress: Progress,
    device: torch.device,
) -> MergeResult:
    """Write the manifest and move `staging` to `out_dir`, or to `OUT.rejected` if it failed."""
    elapsed_s = time.monotonic() - started_s
    weights = weight_digests(staging)
    manifest = build_manifest(
        base_dir, adapter_dir, lora_config, dtype, staging, verification, weights, elapsed_s, device
    )
    write_json(manifest, staging / MANIFEST_NAME)
    target = out_dir if verification.passed else out_dir.with_name(f"{out_dir.name}.rejected")
    replace_dir(staging, target)
    result = MergeResult(
        out_dir=target,
        manifest_path=target / MANIFEST_NAME,
        dtype=dtype,
        verification=verification,
        weight_sha256=MappingProxyType(weights),
        elapsed_s=elapsed_s,
        device=device.type,
    )
    if not verification.passed:
        raise VerificationError(
            f"verification failed: the merged model's logits differ from base+adapter by up to "
            f"{verification.max_abs_diff:.3g}, above the {dtype} tolerance {verification.tolerance:.3g}; "
            f"nothing was written to {out_dir}, the rejected output is in {target} for inspection",
            result,
        )
    progress(f"wrote {target} ({elapsed_s:.1f} s)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student merge`."""
    parser.add_argument("--base", type=Path, required=True, help="base model directory (transformers save_pretrained)")
    parser.add_argument("--adapter", type=Path, required=True, help="LoRA adapter directory (peft save_pretrained)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged model (must be new or empty)")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="dtype of the saved weights (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where to load, merge and verify: cpu, or cuda (an NVIDIA GPU) (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it already has files")


def run(args: argparse.Namespace) -> int:
    """`student merge`: 0 on a verified merge, 1 with a one-line error otherwise."""
    try:
        result = merge_adapter(
            args.base, args.adapter, args.out, dtype=args.dtype, force=args.force, device=args.device
        )
    except MergeError as error:
        print(f"student merge: error: {error}", file=sys.stderr)
        return 1
    print(result.out_dir)
    return 0
