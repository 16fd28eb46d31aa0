"""`student serve --profile`: a profile fills only what flags and STUDENT_* variables left alone."""

from __future__ import annotations

import pytest

from server.runtime.cli import build_parser
from server.runtime.profiles import PROFILES
from server.runtime.serve import ServeError, settings_from_args
from server.runtime.settings import Settings


def settings_for(argv: list[str]) -> Settings:
    return settings_from_args(build_parser("serve").parse_args(["serve", *argv]))


def test_rtx4090_profile_sets_its_documented_defaults() -> None:
    settings = settings_for(["--profile", "rtx4090"])
    assert (settings.device, settings.dtype, settings.gpu_memory_utilization) == ("gpu", "bfloat16", 0.92)
    assert (settings.max_model_len, settings.max_num_seqs, settings.profile) == (4096, 32, "rtx4090")


def test_flags_and_environment_win_over_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_MAX_MODEL_LEN", "2048")
    settings = settings_for(["--profile", "rtx4090-fp8", "--max-num-seqs", "8"])
    assert (settings.max_model_len, settings.max_num_seqs) == (2048, 8)
    assert settings.vllm_extra_args == ["--quantization", "fp8"]


def test_profile_from_the_environment_and_an_unknown_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_PROFILE", "rtx4090-awq")
    assert settings_for([]).dtype == "float16"
    monkeypatch.setenv("STUDENT_PROFILE", "h100")
    with pytest.raises(ServeError, match="unknown profile 'h100'; known: rtx4090"):
        settings_for([])


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_is_valid_settings(name: str) -> None:
    assert Settings(**PROFILES[name]).resolved_device() == "gpu"
