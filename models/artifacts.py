"""What every model-making command shares: its error base, digests, manifests, atomic directories.

`student merge`, `student train-lora`, `student base-model`, `student demo-model` and
`student distill` each write a directory of files that is either complete or absent: they build
it in a hidden staging directory beside the target and rename it into place at the end, and
they record a manifest of what went in (file digests, library versions, the device). The pieces
for that live here, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import peft
import safetensors
import tokenizers
import torch
import transformers
from transformers.utils import logging as transformers_logging

DEVICES = ("cpu", "cuda")


class ArtifactError(Exception):
    """A model artifact that cannot be made as asked; the message says what to fix.

    The base of every such command's own error, so a caller can catch them all at once.
    """


class DeviceError(ArtifactError):
    """The asked-for torch device cannot be used here; the message says why."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(data: Mapping[str, object], path: Path) -> None:
    """Indented UTF-8 JSON with a final newline (manifests are read by people too)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def staging_dir(parent: Path, name: str, tag: str) -> Path:
    """A new hidden directory `parent/.name.tag-XXXXXXXX`.

    Unlike `tempfile.mkdtemp` (always mode 0700) it honours the umask, so the directory renamed
    into place later has the permissions a plain `mkdir` would give it.
    """
    while True:
        path = parent / f".{name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`, moving an existing `target` aside first and deleting it after."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(source, target)
        return
    old = staging_dir(target.parent, target.name, "old")
    os.rename(target, old / target.name)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes a model's bytes (recorded in manifests and cache keys)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


@contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' per-file progress bars (our own progress lines say what is happening)."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def check_device(device: str) -> torch.device:
    """The torch device for `--device`; `DeviceError` naming the cause when it cannot be used."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this PyTorch ({torch.__version__}) was built without CUDA"
        else:
            why = (
                f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU: no NVIDIA driver, "
                "or CUDA_VISIBLE_DEVICES hides every GPU"
            )
        raise DeviceError(f"--device cuda was asked for, but CUDA is not available: {why}; use --device cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """What a manifest records about the device: the GPU's name, or the CPU architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.machine() or "cpu"


def machine_description() -> dict[str, object]:
    """Where something ran, for its record: CPU model, cores, OS (a GPU is named apart)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}"}
