from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.runtime.settings import Settings


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


# --- hybrid routing -------------------------------------------------------------------------

REMOTE = {"remote_url": "https://api.example.com/v1/", "remote_model": "deepseek-chat"}


@pytest.mark.parametrize(
    ("price", "expected"),
    [("0.27,1.10", (0.27, 1.10)), (" 0.42 ", (0.42, 0.42)), ("gpt-4.1", (8.0, 8.0))],
)
def test_the_remote_price_is_two_numbers_one_or_a_table_entry(price: str, expected: tuple[float, float]) -> None:
    settings = Settings(**REMOTE, remote_price=price)
    assert settings.remote_url == "https://api.example.com"
    assert (settings.remote_api_price.input_usd_per_mtok, settings.remote_api_price.output_usd_per_mtok) == expected


def test_the_remote_models_table_entry_is_its_default_price() -> None:
    settings = Settings(remote_url="https://api.deepseek.com", remote_model="deepseek-v3.2")
    assert settings.remote_api_price.input_usd_per_mtok == 0.42
    assert Settings().remote_api_price is None and not Settings().has_remote


def test_the_remote_key_is_read_once_from_the_named_variable_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_CLOUD_KEY", "sk-cloud-0123456789abcdef")
    settings = Settings(**REMOTE, remote_price="1", remote_api_key_env="SHOP_CLOUD_KEY")
    monkeypatch.delenv("SHOP_CLOUD_KEY")
    assert settings.remote_api_key == "sk-cloud-0123456789abcdef"
    assert "sk-cloud" not in repr(settings) and "sk-cloud" not in settings.model_dump_json()
    assert Settings(**REMOTE, remote_price="1").remote_api_key is None  # no variable named: no key sent


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"remote_url": "https://api.example.com"}, "remote_model"),
        ({**REMOTE}, "remote_price"),
        ({**REMOTE, "remote_price": "cheap"}, "remote_price 'cheap'"),
        ({**REMOTE, "remote_price": "1,2,3"}, "one or two numbers"),
        ({**REMOTE, "remote_price": "-1"}, "one or two numbers"),
        ({**REMOTE, "remote_price": "1", "remote_api_key_env": "NO_SUCH_VARIABLE_HERE"}, "NO_SUCH_VARIABLE_HERE"),
        ({"remote_model": "deepseek-chat"}, "no remote_url"),
        ({"remote_url": "api.example.com", "remote_model": "m", "remote_price": "1"}, "remote URL must look like"),
        ({"route_header": "X Route"}, "HTTP header name"),
    ],
)
def test_an_incomplete_remote_is_refused_naming_the_setting(kwargs: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(**kwargs)


def test_routing_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_ROUTE_KEYWORDS", "tại sao, vì sao,")
    monkeypatch.setenv("STUDENT_ROUTE_REMOTE_MODELS", '["cloud", "gpt"]')
    monkeypatch.setenv("STUDENT_FALLBACK_TO_REMOTE", "false")
    rules = Settings(**REMOTE, remote_price="1").routing_rules
    assert rules.keywords == ("tại sao", "vì sao") and not rules.fallback
    assert rules.remote_models == {"cloud", "gpt", "deepseek-chat"}
    monkeypatch.setenv("STUDENT_ROUTE_KEYWORDS", "")
    assert Settings().routing_rules.keywords == ()


def test_the_remote_model_means_remote_unless_the_student_has_that_name() -> None:
    assert Settings(**REMOTE, remote_price="1").routing_rules.remote_models == {"remote", "deepseek-chat"}
    same = Settings(remote_url="http://cloud:8000", remote_model="student", remote_price="1")
    assert same.routing_rules.remote_models == {"remote"}
    assert same.routing_rules.keywords == ("tại sao", "phân tích", "so sánh") and same.routing_rules.fallback


# --- per-replica energy through DCGM exporters ---------------------------------------------------

GPU1, GPU2 = "http://gpu1:8001", "http://gpu2:8001"
UUID = "GPU-a04e5d19-6c37-2f8b-b1d9-0e8c3a5f7b22"


def test_each_replica_may_name_its_hosts_dcgm_exporter_and_gpus() -> None:
    settings = Settings(
        upstream_urls=[f"{GPU1}/v1", GPU2],
        energy_exporters=[f"{GPU1}/v1=http://gpu1:9400#0,1", f"{GPU2}/=http://gpu2:9400/metrics#{UUID}"],
    )
    assert {replica: (target.url, target.gpus) for replica, target in settings.energy_exporters.items()} == {
        GPU1: ("http://gpu1:9400/metrics", ("0", "1")),
        GPU2: ("http://gpu2:9400/metrics", (UUID,)),
    }
    assert Settings(upstream_urls=[GPU1]).energy_exporters == {} and Settings().energy_exporter_interval_s == 1.0


@pytest.mark.parametrize(
    "value",
    [
        f"{GPU1}=http://gpu1:9400#0,1,{GPU2}=http://gpu2:9400",  # a part without '=' continues the GPUs
        f'["{GPU1}=http://gpu1:9400#0,1", "{GPU2}=http://gpu2:9400"]',
        f'{{"{GPU1}": {{"url": "http://gpu1:9400", "gpus": [0, 1]}}, "{GPU2}": "http://gpu2:9400"}}',
    ],
)
def test_energy_exporters_come_from_the_environment_as_json_or_a_comma_list(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STUDENT_UPSTREAM_URLS", f"{GPU1},{GPU2}")
    monkeypatch.setenv("STUDENT_ENERGY_EXPORTERS", value)
    exporters = Settings().energy_exporters
    assert [(replica, target.url, target.gpus) for replica, target in exporters.items()] == [
        (GPU1, "http://gpu1:9400/metrics", ("0", "1")),
        (GPU2, "http://gpu2:9400/metrics", ()),
    ]


@pytest.mark.parametrize(
    ("exporters", "named"),
    [
        ([f"{GPU2}=http://gpu2:9400"], "not an upstream"),
        ([f"{GPU1}=http://gpu1:9400", f"{GPU1}=http://other:9400"], "given twice"),
        ([f"{GPU1}=gpu1:9400"], "http://host:9400/metrics"),
        ([f"{GPU1}=http://gpu1:9400#zero"], "gpu index"),
    ],
)
def test_a_wrong_energy_exporter_fails_fast_saying_why(exporters: list[str], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(upstream_urls=[GPU1], energy_exporters=exporters)
