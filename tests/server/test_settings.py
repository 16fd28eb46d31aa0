from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings


def test_defaults_match_the_documented_ports() -> None:
    settings = Settings()
    assert (settings.host, settings.port, settings.vllm_port) == ("127.0.0.1", 8000, 8001)
    assert settings.upstream_base_url == "http://127.0.0.1:8001"
    assert settings.upstream_base_urls == ["http://127.0.0.1:8001"]
    assert settings.manages_vllm
    assert settings.health_check_interval_s == 2.0


def test_environment_is_read_with_the_student_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_PORT", "9100")
    monkeypatch.setenv("STUDENT_SERVED_MODEL_NAME", "shop")
    settings = Settings()
    assert (settings.port, settings.served_model_name) == (9100, "shop")
    assert Settings(port=9200).port == 9200


@pytest.mark.parametrize("url", ["http://10.0.0.5:8001/v1/", "http://10.0.0.5:8001", "http://10.0.0.5:8001/"])
def test_upstream_url_is_normalised_to_the_server_root(url: str) -> None:
    settings = Settings(upstream_urls=[url])
    assert settings.upstream_base_urls == ["http://10.0.0.5:8001"]
    assert settings.upstream_base_url == "http://10.0.0.5:8001"
    assert not settings.manages_vllm


def test_several_upstreams_keep_their_order() -> None:
    settings = Settings(upstream_urls=["http://gpu1:8001/v1", "http://gpu2:8001"])
    assert settings.upstream_base_urls == ["http://gpu1:8001", "http://gpu2:8001"]
    assert settings.upstream_base_url == "http://gpu1:8001"
    assert not settings.manages_vllm


@pytest.mark.parametrize("variable", ["STUDENT_UPSTREAM_URLS", "STUDENT_UPSTREAM_URL"])
def test_upstreams_come_from_the_environment_comma_separated(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "http://gpu1:8001/v1, http://gpu2:8001")
    assert Settings().upstream_base_urls == ["http://gpu1:8001", "http://gpu2:8001"]
    assert Settings(upstream_urls=["http://flag:1"]).upstream_base_urls == ["http://flag:1"]  # flags win


def test_the_single_upstream_keyword_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_UPSTREAM_URL", "http://from-env:8001")
    assert Settings(upstream_url="http://10.0.0.5:8001/v1").upstream_base_urls == ["http://10.0.0.5:8001"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"upstream_urls": ["localhost:8001"]},
        {"upstream_urls": ["http://a:1", "http://a:1/v1"]},  # the same replica twice
        {"health_check_interval_s": 0},
        {"port": 70000},
        {"port": 8001, "vllm_port": 8001},
        {"kv_cache_gib": 0},
    ],
)
def test_unsafe_values_fail_fast(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_explicit_device_wins_over_detection() -> None:
    assert Settings(device="cpu").resolved_device() == "cpu"
    assert Settings(device="gpu").resolved_device() == "gpu"
