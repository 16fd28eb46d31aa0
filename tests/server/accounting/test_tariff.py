"""Electricity and API money: the tariff's arithmetic, the article's prices, and the settings that feed them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.accounting.tariff import (
    ApiPrice,
    Tariff,
    api_cost_usd,
    api_costs_usd,
    default_api_prices,
    projected_month,
)
from server.runtime.settings import Settings

KWH_J = 3_600_000.0


# --- Tariff -----------------------------------------------------------------------------


def test_energy_cost_is_kwh_times_price() -> None:
    tariff = Tariff(price_per_kwh=2998.0)
    assert tariff.energy_cost(KWH_J) == pytest.approx(2998.0)
    assert tariff.energy_cost(KWH_J / 4) == pytest.approx(749.5)
    assert tariff.energy_cost(0.0) == 0.0


def test_energy_cost_applies_the_wall_power_factor() -> None:
    assert Tariff(price_per_kwh=2000.0, wall_power_factor=1.5).energy_cost(KWH_J) == pytest.approx(3000.0)


def test_unknown_energy_costs_nothing_known() -> None:
    assert Tariff().energy_cost(None) is None


def test_defaults_are_evn_tier_4_in_vnd_at_the_articles_rate() -> None:
    tariff = Tariff()
    assert (tariff.price_per_kwh, tariff.currency, tariff.usd_rate, tariff.wall_power_factor) == (
        2998.0,
        "VND",
        25_000.0,
        1.0,
    )


def test_to_usd_divides_by_the_rate() -> None:
    tariff = Tariff(currency="VND", usd_rate=25_000.0)
    assert tariff.to_usd(50_000.0) == pytest.approx(2.0)
    assert tariff.to_usd(None) is None


@pytest.mark.parametrize("currency", ["USD", "usd"])
def test_to_usd_is_one_to_one_for_dollars(currency: str) -> None:
    assert Tariff(price_per_kwh=0.15, currency=currency, usd_rate=25_000.0).to_usd(3.0) == 3.0


# --- API prices -------------------------------------------------------------------------


def test_api_cost_uses_separate_input_and_output_prices() -> None:
    price = ApiPrice(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0)
    assert api_cost_usd(price, 1_000_000, 0) == pytest.approx(2.0)
    assert api_cost_usd(price, 0, 1_000_000) == pytest.approx(8.0)
    assert api_cost_usd(price, 1000, 500) == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)


def test_unknown_token_counts_count_as_zero() -> None:
    price = ApiPrice(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0)
    assert api_cost_usd(price, None, None) == 0.0
    assert api_cost_usd(price, None, 1_000_000) == pytest.approx(8.0)


def test_api_prices_cannot_be_negative() -> None:
    with pytest.raises(ValidationError):
        ApiPrice(input_usd_per_mtok=-1.0, output_usd_per_mtok=1.0)


def test_api_costs_cover_every_api_in_the_table() -> None:
    prices = {
        "cheap": ApiPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
        "dear": ApiPrice(input_usd_per_mtok=10.0, output_usd_per_mtok=30.0),
    }
    costs = api_costs_usd(prices, 200_000, 100_000)
    assert costs == pytest.approx({"cheap": 0.2 + 0.2, "dear": 2.0 + 3.0})


def test_default_prices_are_the_articles_table_for_all_tokens() -> None:
    prices = default_api_prices()
    assert {name: (p.input_usd_per_mtok, p.output_usd_per_mtok) for name, p in prices.items()} == {
        "gpt-4.1": (8.0, 8.0),
        "claude-sonnet-4.5": (15.0, 15.0),
        "deepseek-v3.2": (0.42, 0.42),
    }
    assert all(price.source for price in prices.values())


@pytest.mark.parametrize(("api", "month_usd"), [("gpt-4.1", 1200.0), ("deepseek-v3.2", 63.0)])
def test_the_articles_worked_example(api: str, month_usd: float) -> None:
    """10,000 requests a day × 500 tokens × 30 days: $1,200 on GPT-4.1, $63 on DeepSeek V3.2."""
    per_request = api_cost_usd(default_api_prices()[api], 200, 300)  # 500 tokens, split either way
    assert per_request * 10_000 * 30 == pytest.approx(month_usd)


# --- projected month --------------------------------------------------------------------


def test_projected_month_is_idle_all_month_plus_the_requests() -> None:
    # 100 W × 24 h × 30 d = 72 kWh; 360 J × 1,000 requests/day × 30 d = 3 kWh; 75 kWh × 2,000.
    assert projected_month(100.0, 360.0, 1000.0, Tariff(price_per_kwh=2000.0)) == pytest.approx(150_000.0)


def test_projected_month_goes_through_the_tariff_and_its_days() -> None:
    tariff = Tariff(price_per_kwh=2000.0, wall_power_factor=1.2)
    # 100 W × 24 h × 15 d = 36 kWh, no requests; × 1.2 at the wall.
    assert projected_month(100.0, 360.0, 0.0, tariff, days=15.0) == pytest.approx(36 * 1.2 * 2000.0)


@pytest.mark.parametrize(("idle_w", "per_request_j"), [(None, 360.0), (100.0, None), (None, None)])
def test_projected_month_is_unknown_when_either_energy_is(idle_w: float | None, per_request_j: float | None) -> None:
    assert projected_month(idle_w, per_request_j, 1000.0, Tariff()) is None


# --- settings ---------------------------------------------------------------------------


def test_settings_tariff_defaults_to_the_documented_one() -> None:
    settings = Settings()
    assert settings.tariff == Tariff()
    assert settings.api_prices == default_api_prices()


def test_settings_read_prices_and_wall_factor_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDENT_PRICE_PER_KWH", "3500.5")
    monkeypatch.setenv("STUDENT_WALL_POWER_FACTOR", "1.3")
    monkeypatch.setenv("STUDENT_CURRENCY", "USD")
    monkeypatch.setenv("STUDENT_USD_RATE", "1")
    assert Settings().tariff == Tariff(price_per_kwh=3500.5, currency="USD", usd_rate=1.0, wall_power_factor=1.3)


def test_settings_read_api_prices_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "STUDENT_API_PRICES",
        '{"gpt-4.1": {"input_usd_per_mtok": 2, "output_usd_per_mtok": 8, "source": "price list"}}',
    )
    assert Settings().api_prices == {
        "gpt-4.1": ApiPrice(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0, source="price list")
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STUDENT_WALL_POWER_FACTOR", "0.9"),
        ("STUDENT_PRICE_PER_KWH", "-1"),
        ("STUDENT_API_PRICES", "not json"),
        ("STUDENT_API_PRICES", '{"x": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}}'),
    ],
)
def test_settings_refuse_unsafe_money_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):  # ValidationError, or pydantic-settings' SettingsError for bad JSON
        Settings()
