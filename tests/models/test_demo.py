"""The demo student: the real base plus the committed shop LoRA, merged, cached, and made again."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import base_model, demo
from models.dataset_check import check_dataset
from models.demo import ADAPTER_DIR, ADAPTER_FILES, BUILD_INFO_NAME, DATASET_FILE, DEMO_LORA, DEMO_TRAINING
from models.merge import MANIFEST_NAME
from models.train_lora import TRAINING_RECORD


class Recorder:
    """A progress callback that keeps the messages, to tell a build from a cache hit."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def built(self) -> bool:
        return any(message.startswith("building the demo student") for message in self.messages)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    assert demo.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(demo.CACHE_ENV)
    assert demo.default_cache_dir() == Path.home() / ".cache" / "student-serve"


def test_the_committed_adapter_is_small_bf16_and_was_trained_on_the_committed_data(
    smollm2_base: Path, tmp_path: Path
) -> None:
    """Editing the data or the base without `student demo-model --retrain` fails here."""
    weights = load_file(str(ADAPTER_DIR / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert (ADAPTER_DIR / "adapter_model.safetensors").stat().st_size < 8e6
    config = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    lora = (config["r"], config["lora_alpha"], config["lora_dropout"])
    assert lora == (DEMO_LORA.r, DEMO_LORA.alpha, DEMO_LORA.dropout)
    assert config["base_model_name_or_path"] == base_model.MODEL_NAME

    record = json.loads((ADAPTER_DIR / TRAINING_RECORD).read_text())
    base_manifest = json.loads((smollm2_base / base_model.MANIFEST_NAME).read_text())
    assert record["base_weights_sha256"] == {name: entry["sha256"] for name, entry in base_manifest["weights"].items()}
    report = check_dataset(DATASET_FILE, split_out=tmp_path / "split")
    assert not report.problems
    assert record["data"]["sha256"] == demo.artifacts.sha256_file(tmp_path / "split" / "train.jsonl")
    assert record["validation"]["sha256"] == demo.artifacts.sha256_file(tmp_path / "split" / "validation.jsonl")
    assert record["config"] == json.loads(json.dumps(asdict(DEMO_TRAINING)))
    assert record["validation_loss"]["after"] < record["validation_loss"]["before"]
    assert record["machine"]["cpu_cores"] and record["train"]["elapsed_s"] > 0


def test_demo_build_merges_and_verifies(demo_build: tuple[Path, list[str]]) -> None:
    model_dir, messages = demo_build
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["adapter_effect_max_abs_diff"] > 1.0
    info = json.loads((model_dir / BUILD_INFO_NAME).read_text())
    assert info["adapter_training"]["validation_loss"]["after"] < info["adapter_training"]["validation_loss"]["before"]
    assert any(message.startswith("building the demo student") for message in messages)
    assert not [path.name for path in model_dir.parent.iterdir() if path.name.startswith(".")]


def test_demo_build_is_a_cache_hit_the_second_time(demo_build: tuple[Path, list[str]]) -> None:
    model_dir, _ = demo_build
    info_before = (model_dir / BUILD_INFO_NAME).read_text()
    second = Recorder()
    assert demo.ensure_demo_student(model_dir.parent, second) == model_dir
    assert not second.built() and second.messages[-1].startswith(f"cache hit: {model_dir}")
    assert (model_dir / BUILD_INFO_NAME).read_text() == info_before


def test_another_adapter_is_another_cache_key(demo_build: tuple[Path, list[str]], tmp_path: Path) -> None:
    model_dir, _ = demo_build
    info = json.loads((model_dir / BUILD_INFO_NAME).read_text())
    other = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, other)
    weights = load_file(str(other / "adapter_model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] * 2
    save_file(weights, str(other / "adapter_model.safetensors"))
    base_key = demo._base_key(Path(info["base"]))
    assert demo.cache_key(base_key, other) != info["cache_key"] == demo.cache_key(base_key, ADAPTER_DIR)


def test_a_missing_adapter_file_is_a_clear_error(smollm2_base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, adapter)
    (adapter / ADAPTER_FILES[1]).unlink()
    with pytest.raises(demo.DemoError, match=r"lacks adapter_model\.safetensors; restore it from git or make it again"):
        demo.ensure_demo_student(smollm2_base.parent, lambda _: None, adapter_dir=adapter)


def test_out_replaces_only_demo_builds_unless_forced(
    demo_build: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir, _ = demo_build
    monkeypatch.setenv(demo.CACHE_ENV, str(model_dir.parent))
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    assert demo.run(parse(["--out", str(out_dir)])) == 1
    assert "is not empty and is not a demo student; pass --force" in capsys.readouterr().err
    assert demo.run(parse(["--out", str(out_dir), "--force"])) == 0
    assert not (out_dir / "notes.txt").exists() and (out_dir / BUILD_INFO_NAME).is_file()
    assert capsys.readouterr().out.strip() == str(out_dir)
    assert demo.run(parse(["--out", str(out_dir)])) == 0
    assert "cache hit" in capsys.readouterr().err


def test_retrain_makes_a_bf16_adapter_with_its_record(smollm2_base: Path, tmp_path: Path) -> None:
    """The retrain path end to end, shortened to 2 steps of 2 chats and validated on 1 % of the chats
    (the real one takes an hour here)."""
    short = replace(DEMO_TRAINING, epochs=None, steps=2, batch_size=2, max_length=96, log_every=1)
    messages: list[str] = []
    adapter = demo.retrain(
        smollm2_base.parent, tmp_path / "adapter", short, "cpu", messages.append, validation_fraction=0.01
    )
    assert sorted(path.name for path in adapter.iterdir()) == sorted(ADAPTER_FILES)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    record = json.loads((adapter / TRAINING_RECORD).read_text())
    assert record["train"]["steps"] == 2 and record["stored_dtype"] == "bfloat16"
    assert record["validation_loss"]["before"] > 0
    assert 0 < record["validation"]["samples"] < 0.02 * (record["data"]["samples"] + record["validation"]["samples"])
    assert any("training and" in message and "validation chats" in message for message in messages)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base_model.MODEL_NAME
