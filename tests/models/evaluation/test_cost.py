"""Cost per 1,000 answers: tokens × price, and a gateway's energy from two real /stats documents.

The documents come from `server.telemetry.stats.build_stats`, the function behind the gateway's
GET /stats, fed with finished requests and meter snapshots: the same schema the gateway serves.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from models.evaluation.cost import NOT_A_GATEWAY, gateway_energy, not_measured, parse_price, token_cost
from models.evaluation.errors import EvalError
from server.accounting.tariff import Tariff, default_api_prices
from server.telemetry.energy_attribution import EnergySnapshot
from server.telemetry.stats import FinishedRequest, StatsBook, StatsInputs, build_stats

TARIFF = Tariff(price_per_kwh=3600.0, currency="VND", usd_rate=25_000.0)  # 1 VND per kJ: easy numbers
UNAVAILABLE = EnergySnapshot(
    "unavailable", "no NVIDIA GPU and no RAPL counters", "unavailable",
    None, None, None, None, None, None, None, False, 0, 0, 0, 0,
)  # fmt: skip


def measured(total_j: float) -> EnergySnapshot:
    return replace(
        UNAVAILABLE, status="ok", reason="NVML, 1 GPU(s)", source="nvml", total_j=total_j, active_j=0.0,
        attributed_j=0.0, idle_j=0.0, unattributed_j=0.0, power_w=100.0, idle_w=50.0,
    )  # fmt: skip


def finished(energy_j: float | None, routed_to: str = "local", remote_cost_usd: float | None = None) -> FinishedRequest:
    return FinishedRequest(
        finished_s=1.0, ok=True, prompt_tokens=40, completion_tokens=16, ttft_ms=None, tpot_ms=None, e2e_ms=80.0,
        energy_j=energy_j, api_cost_usd={}, routed_to=routed_to, remote_cost_usd=remote_cost_usd,
    )  # fmt: skip


def stats(book: StatsBook, energy: EnergySnapshot) -> dict:
    inputs = StatsInputs(energy=energy, tariff=TARIFF, api_prices={}, in_flight=0, upstream={})
    return build_stats(book, inputs, None, book.started_s + 10.0)


def test_gateway_energy_is_the_difference_of_the_counters_around_the_run() -> None:
    book = StatsBook()
    book.add(finished(500.0))  # before the eval: left out
    before = stats(book, measured(2_000.0))
    for _ in range(4):
        book.add(finished(250.0))
    after = stats(book, measured(3_500.0))
    cost = gateway_energy(before, after, sent_requests=4)
    assert cost.measured and cost.reason is None
    assert (cost.gateway_requests, cost.other_requests) == (4, 0)
    assert cost.attributed_j == pytest.approx(1_000.0) and cost.total_j == pytest.approx(1_500.0)
    assert cost.currency == "VND" and cost.electricity == pytest.approx(1.0)
    assert cost.electricity_usd == pytest.approx(1.0 / 25_000.0)
    assert cost.j_per_1000_answers == pytest.approx(250_000.0)
    assert cost.kwh_per_1000_answers == pytest.approx(250_000.0 / 3_600_000.0)
    assert cost.electricity_per_1000_answers == pytest.approx(250.0)
    assert cost.usd_per_1000_answers == pytest.approx(250.0 / 25_000.0)
    assert "250 VND" in cost.summary and "kWh" in cost.summary


def test_requests_from_other_clients_are_counted_and_averaged_in() -> None:
    book = StatsBook()
    before = stats(book, measured(0.0))
    for _ in range(3):
        book.add(finished(100.0))
    book.add(finished(None, routed_to="remote", remote_cost_usd=0.002))
    cost = gateway_energy(before, stats(book, measured(400.0)), sent_requests=2)
    assert (cost.gateway_requests, cost.other_requests) == (4, 2)
    assert cost.attributed_j == pytest.approx(300.0) and cost.remote_usd == pytest.approx(0.002)
    assert cost.usd_per_1000_answers == pytest.approx((0.3 / 25_000.0 + 0.002) * 1000 / 4)


def test_unmeasured_energy_gives_the_gateways_reason() -> None:
    book = StatsBook()
    before = stats(book, UNAVAILABLE)
    book.add(finished(None))
    cost = gateway_energy(before, stats(book, UNAVAILABLE), sent_requests=1)
    assert not cost.measured and cost.reason == "no NVIDIA GPU and no RAPL counters"
    assert cost.summary == "not measured: no NVIDIA GPU and no RAPL counters" and cost.attributed_j is None


def test_no_request_counted_or_no_energy_attributed_is_not_measured() -> None:
    book = StatsBook()
    document = stats(book, measured(10.0))
    assert (
        gateway_energy(document, document, sent_requests=3).reason == "the gateway counted none of the eval's requests"
    )
    book.add(finished(None))
    later = stats(book, measured(20.0))
    assert gateway_energy(document, later, 1).reason == "the gateway attributed no energy to the eval's requests"
    assert not_measured(NOT_A_GATEWAY).summary == "not measured: not a student-serve gateway"


def test_token_cost_per_1000_answers() -> None:
    name, price = parse_price("0.5,2")
    cost = token_cost(name, price, prompt_tokens=40_000, completion_tokens=10_000, answers=200)
    assert cost.usd == pytest.approx(0.04) and cost.usd_per_1000_answers == pytest.approx(0.2)
    assert token_cost(name, price, 0, 0, 0).usd_per_1000_answers is None


def test_prices_from_the_table_or_numbers() -> None:
    assert parse_price("deepseek-v3.2") == ("deepseek-v3.2", default_api_prices()["deepseek-v3.2"])
    assert parse_price("3")[1].output_usd_per_mtok == 3.0
    for bad in ("-1,2", "cheap", "1,2,3", "nan,1"):
        with pytest.raises(EvalError, match="USD per 1M tokens"):
            parse_price(bad)
