"""The /stats numbers: the book of finished requests, percentiles, and the document built from them.

Expected values are worked out by hand in each test (kWh = J / 3.6e6, month = 30 days).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.accounting.tariff import ApiPrice, Tariff, api_costs_usd
from server.telemetry.energy_attribution import LOCAL_METER, EnergyMeter, EnergySnapshot, combined_snapshot
from server.telemetry.power_sources import UnavailableSource
from server.telemetry.stats import (
    EnergyTotals,
    FinishedRequest,
    MeterEnergy,
    StatsBook,
    StatsInputs,
    build_stats,
    percentiles,
)

PRICES = {
    "big": ApiPrice(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0),
    "small": ApiPrice(input_usd_per_mtok=0.5, output_usd_per_mtok=0.5),
}
# 2,000 VND/kWh, 25,000 VND/USD, wall factor 1.5: 1 J costs 1.5 / 3.6e6 × 2,000 VND.
TARIFF = Tariff(price_per_kwh=2000.0, currency="VND", usd_rate=25_000.0, wall_power_factor=1.5)


def vnd(joules: float) -> float:
    return joules * 1.5 / 3_600_000 * 2000


def finished(
    finished_s: float,
    *,
    ok: bool = True,
    prompt: int = 10,
    completion: int = 20,
    ttft: float | None = None,
    tpot: float | None = None,
    e2e: float = 100.0,
    energy: float | None = None,
) -> FinishedRequest:
    """A finished request as the recorder files it (API cost from the same price table)."""
    return FinishedRequest(
        finished_s=finished_s,
        ok=ok,
        prompt_tokens=prompt,
        completion_tokens=completion,
        ttft_ms=ttft,
        tpot_ms=tpot,
        e2e_ms=e2e,
        energy_j=energy,
        api_cost_usd=api_costs_usd(PRICES, prompt, completion),
    )


def ok_snapshot(
    total: float, active: float, idle: float, unattributed: float, *, idle_w: float | None = 7.0
) -> EnergySnapshot:
    return EnergySnapshot(
        status="ok",
        reason="reading NVML",
        source="nvml",
        total_j=total,
        active_j=active,
        attributed_j=active - unattributed,
        idle_j=idle,
        unattributed_j=unattributed,
        power_w=12.0,
        idle_w=idle_w,
        idle_measuring=False,
        requests_in_flight=0,
        intervals=100,
        resets=0,
        gaps=0,
    )


def inputs(energy: EnergySnapshot, in_flight: int = 0) -> StatsInputs:
    return StatsInputs(energy=energy, tariff=TARIFF, api_prices=PRICES, in_flight=in_flight, upstream={"running": 1})


def unavailable() -> EnergySnapshot:
    """What a real meter reports on a machine without NVML or RAPL."""
    return EnergyMeter(UnavailableSource("no NVML or RAPL on this machine")).snapshot()


# --- StatsBook --------------------------------------------------------------------------


def test_book_counts_requests_tokens_and_api_cost() -> None:
    book = StatsBook(started_s=0.0)
    book.add(finished(1.0, prompt=1000, completion=500))
    book.add(finished(2.0, ok=False, prompt=200, completion=0))
    book.add(finished(3.0, prompt=300, completion=100))
    assert (book.total, book.ok) == (3, 2)
    assert (book.prompt_tokens, book.completion_tokens) == (1500, 600)
    assert book.api_cost_usd == pytest.approx(
        {"big": (1500 * 2.0 + 600 * 8.0) / 1e6, "small": (1500 + 600) * 0.5 / 1e6}
    )


def test_book_keeps_only_the_newest_requests_but_counts_them_all() -> None:
    book = StatsBook(retention=3, started_s=0.0)
    for second in range(1, 6):
        book.add(finished(float(second)))
    assert [r.finished_s for r in book.recent()] == [3.0, 4.0, 5.0]
    assert book.total == 5


def test_recent_keeps_finishing_order_and_includes_the_cut_off() -> None:
    book = StatsBook(started_s=0.0)
    for second in (1.0, 2.0, 3.0, 4.0):
        book.add(finished(second))
    assert [r.finished_s for r in book.recent(2.0)] == [2.0, 3.0, 4.0]
    assert [r.finished_s for r in book.recent(2.5)] == [3.0, 4.0]
    assert book.recent(4.5) == []
    assert [r.finished_s for r in book.recent(None)] == [1.0, 2.0, 3.0, 4.0]


def test_energy_since_subtracts_the_last_totals_at_or_before_the_cut_off() -> None:
    book = StatsBook(started_s=0.0)
    book.note_energy(10.0, EnergyTotals(100.0, 10.0, 85.0, 5.0))
    book.note_energy(20.0, EnergyTotals(200.0, 30.0, 160.0, 10.0))
    book.note_energy(30.0, EnergyTotals(300.0, 60.0, 225.0, 15.0))
    now = EnergyTotals(400.0, 100.0, 280.0, 20.0)
    assert book.energy_since(20.0, now) == EnergyTotals(200.0, 70.0, 120.0, 10.0)  # noted exactly at the cut-off
    assert book.energy_since(25.0, now) == EnergyTotals(200.0, 70.0, 120.0, 10.0)  # the one before it
    assert book.energy_since(35.0, now) == EnergyTotals(100.0, 40.0, 55.0, 5.0)


def test_energy_since_before_the_first_note_counts_from_the_meters_start() -> None:
    book = StatsBook(started_s=0.0)
    book.note_energy(10.0, EnergyTotals(100.0, 10.0, 85.0, 5.0))
    now = EnergyTotals(400.0, 100.0, 280.0, 20.0)
    assert book.energy_since(5.0, now) == now


def test_energy_history_is_trimmed_to_its_span() -> None:
    book = StatsBook(energy_history_s=100.0, started_s=0.0)
    old = EnergyTotals(1.0, 0.0, 1.0, 0.0)
    boundary = EnergyTotals(50.0, 10.0, 40.0, 0.0)
    book.note_energy(0.0, old)
    book.note_energy(50.0, boundary)
    book.note_energy(100.0, EnergyTotals(100.0, 20.0, 80.0, 0.0))
    book.note_energy(150.0, EnergyTotals(150.0, 30.0, 120.0, 0.0))  # drops what is older than 50 s
    now = EnergyTotals(160.0, 30.0, 130.0, 0.0)
    assert book.energy_since(50.0, now) == now.minus(boundary)  # exactly 100 s old: kept
    assert book.energy_since(49.0, now) != now.minus(old)  # 150 s old: no longer used as a base


# --- percentiles ------------------------------------------------------------------------


def test_percentiles_interpolate_linearly() -> None:
    # ranks 0.5×3 = 1.5, 0.95×3 = 2.85, 0.99×3 = 2.97 between the sorted values
    assert percentiles([40.0, 10.0, 30.0, 20.0]) == pytest.approx({"count": 4, "p50": 25.0, "p95": 38.5, "p99": 39.7})


def test_percentiles_of_one_to_a_hundred() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentiles(values) == pytest.approx({"count": 100, "p50": 50.5, "p95": 95.05, "p99": 99.01})


def test_percentiles_skip_missing_values() -> None:
    assert percentiles([None, 5.0, None]) == {"count": 1, "p50": 5.0, "p95": 5.0, "p99": 5.0}


@pytest.mark.parametrize("values", [[], [None, None]])
def test_percentiles_of_nothing_are_none(values: list[float | None]) -> None:
    assert percentiles(values) == {"count": 0, "p50": None, "p95": None, "p99": None}


# --- build_stats ------------------------------------------------------------------------


def test_unavailable_energy_leaves_every_energy_figure_unknown_but_prices_api_costs() -> None:
    book = StatsBook(started_s=0.0)
    book.add(finished(100.0, prompt=1000, completion=500))
    book.add(finished(200.0, prompt=3000, completion=1500))
    stats = build_stats(book, inputs(unavailable()), None, now_s=1000.0)

    energy = stats["energy"]
    assert (energy["status"], energy["reason"]) == ("unavailable", "no NVML or RAPL on this machine")
    for key in ("total_j", "active_j", "idle_j", "unattributed_j", "kwh", "power_w", "idle_w"):
        assert energy[key] is None, key
    cost = stats["cost"]
    for key in ("electricity", "electricity_usd", "per_request", "projected_month", "projected_month_usd"):
        assert cost[key] is None, key

    big = cost["api_equivalent"]["big"]
    assert big["cost_usd"] == pytest.approx((4000 * 2.0 + 2000 * 8.0) / 1e6)
    assert big["saving_usd"] is None
    assert big["projected_month_saving_usd"] is None
    # 2 requests in 1,000 s: 172.8 a day, at $0.012 each
    assert cost["requests_per_day"] == pytest.approx(172.8)
    assert big["projected_month_usd"] == pytest.approx(0.012 * 172.8 * 30)
    assert set(cost["api_equivalent"]) == {"big", "small"}


def windowed_book() -> StatsBook:
    """Started at 0 s; energy noted at 0, 400, 600 s; requests at 450 (ok), 600, 700 (ok) and 900 (error)."""
    book = StatsBook(started_s=0.0)
    book.note_energy(0.0, EnergyTotals(0.0, 0.0, 0.0, 0.0))
    book.note_energy(400.0, EnergyTotals(4000.0, 1000.0, 2800.0, 200.0))
    book.note_energy(600.0, EnergyTotals(6000.0, 1500.0, 4200.0, 300.0))
    book.add(finished(450.0, prompt=1000, completion=1000, ttft=1.0, e2e=1.0, energy=999.0))
    book.add(finished(600.0, prompt=100, completion=200, ttft=40.0, tpot=5.0, e2e=500.0, energy=30.0))
    book.add(finished(700.0, prompt=300, completion=100, ttft=60.0, tpot=7.0, e2e=700.0, energy=60.0))
    book.add(finished(900.0, ok=False, prompt=50, completion=0, e2e=99_999.0))
    return book


def test_window_counts_only_the_requests_inside_it() -> None:
    snapshot = ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)
    stats = build_stats(windowed_book(), inputs(snapshot, in_flight=2), 500.0, 1000.0)
    assert stats["window_s"] == 500.0
    assert stats["uptime_s"] == 1000.0
    assert stats["requests"] == {"total": 3, "ok": 2, "error": 1, "in_flight": 2}
    assert stats["tokens"] == {"prompt": 450, "completion": 300}
    assert stats["throughput"] == pytest.approx({"requests_per_s": 3 / 500, "completion_tokens_per_s": 300 / 500})
    assert stats["upstream"] == {"running": 1}


def test_latency_percentiles_cover_successful_requests_only() -> None:
    stats = build_stats(windowed_book(), inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), 500.0, 1000.0)
    latency = stats["latency_ms"]
    assert latency["e2e"] == pytest.approx({"count": 2, "p50": 600.0, "p95": 690.0, "p99": 698.0})
    assert latency["ttft"] == pytest.approx({"count": 2, "p50": 50.0, "p95": 59.0, "p99": 59.8})
    assert latency["tpot"]["count"] == 2


def test_window_energy_is_the_difference_of_the_meters_totals() -> None:
    stats = build_stats(windowed_book(), inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), 500.0, 1000.0)
    energy = stats["energy"]
    assert energy["status"] == "ok"
    # cut-off at 500 s: the totals noted at 400 s are the base
    assert (energy["total_j"], energy["active_j"], energy["idle_j"], energy["unattributed_j"]) == pytest.approx(
        (6000.0, 2000.0, 3700.0, 300.0)
    )
    assert energy["kwh"] == pytest.approx(6000.0 / 3_600_000)
    assert (energy["power_w"], energy["idle_w"], energy["wall_power_factor"]) == (12.0, 7.0, 1.5)


def test_window_money_from_measured_energy_and_observed_rate() -> None:
    stats = build_stats(windowed_book(), inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), 500.0, 1000.0)
    cost = stats["cost"]
    assert (cost["currency"], cost["price_per_kwh"], cost["usd_rate"], cost["wall_power_factor"]) == (
        "VND",
        2000.0,
        25_000.0,
        1.5,
    )
    assert cost["electricity"] == pytest.approx(5.0)  # 6,000 J × 1.5 = 0.0025 kWh × 2,000
    assert cost["electricity_usd"] == pytest.approx(5.0 / 25_000)
    assert cost["per_request"] == pytest.approx(vnd(45.0))  # mean of 30 J and 60 J; the error had none
    assert cost["requests_per_day"] == pytest.approx(3 / 500 * 86_400)
    month_j = 7.0 * 86_400 * 30 + 45.0 * (3 / 500 * 86_400) * 30
    assert cost["projected_month"] == pytest.approx(vnd(month_j))
    assert cost["projected_month_usd"] == pytest.approx(vnd(month_j) / 25_000)


def test_window_api_equivalent_cost_saving_and_month() -> None:
    stats = build_stats(windowed_book(), inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), 500.0, 1000.0)
    big = stats["cost"]["api_equivalent"]["big"]
    cost_usd = (450 * 2.0 + 300 * 8.0) / 1e6
    month_usd = cost_usd / 3 * (3 / 500 * 86_400) * 30
    month_electricity_usd = vnd(7.0 * 86_400 * 30 + 45.0 * (3 / 500 * 86_400) * 30) / 25_000
    assert big == pytest.approx(
        {
            "cost_usd": cost_usd,
            "saving_usd": cost_usd - 5.0 / 25_000,
            "projected_month_usd": month_usd,
            "projected_month_saving_usd": month_usd - month_electricity_usd,
        }
    )
    assert stats["cost"]["api_equivalent"]["small"]["cost_usd"] == pytest.approx((450 + 300) * 0.5 / 1e6)


def test_without_a_window_counts_are_all_time_even_after_retention_dropped_requests() -> None:
    book = StatsBook(retention=2, started_s=0.0)
    book.add(finished(100.0, prompt=1000, completion=1000, e2e=10_000.0, energy=500.0))
    book.add(finished(200.0, ok=False, prompt=7, completion=0))
    book.add(finished(300.0, prompt=100, completion=200, e2e=300.0, energy=30.0))
    book.add(finished(400.0, prompt=300, completion=100, e2e=500.0, energy=60.0))
    book.note_energy(900.0, EnergyTotals(9000.0, 2000.0, 6800.0, 200.0))  # a window would start from here
    stats = build_stats(book, inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), None, 1000.0)

    assert stats["window_s"] is None
    assert stats["requests"] == {"total": 4, "ok": 3, "error": 1, "in_flight": 0}
    assert stats["tokens"] == {"prompt": 1407, "completion": 1300}
    assert stats["latency_ms"]["e2e"]["count"] == 2  # percentiles only see what is kept
    assert stats["latency_ms"]["e2e"]["p50"] == pytest.approx(400.0)
    assert stats["energy"]["total_j"] == 10_000.0  # all the meter measured
    cost = stats["cost"]
    assert cost["requests_per_day"] == pytest.approx(4 / 1000 * 86_400)
    assert cost["per_request"] == pytest.approx(vnd(45.0))
    big_usd = (1407 * 2.0 + 1300 * 8.0) / 1e6
    assert cost["api_equivalent"]["big"]["cost_usd"] == pytest.approx(big_usd)
    assert cost["api_equivalent"]["big"]["projected_month_usd"] == pytest.approx(big_usd / 4 * (4 / 1000 * 86_400) * 30)


def test_a_window_longer_than_the_uptime_spans_the_uptime() -> None:
    book = StatsBook(started_s=900.0)
    book.add(finished(950.0, completion=50))
    stats = build_stats(book, inputs(unavailable()), 3600.0, 1000.0)
    assert (stats["window_s"], stats["uptime_s"]) == (3600.0, 100.0)
    assert stats["throughput"] == pytest.approx({"requests_per_s": 1 / 100, "completion_tokens_per_s": 50 / 100})
    assert stats["cost"]["requests_per_day"] == pytest.approx(864.0)


def test_unknown_idle_power_leaves_the_month_unknown() -> None:
    snapshot = ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0, idle_w=None)
    stats = build_stats(windowed_book(), inputs(snapshot), 500.0, 1000.0)
    assert stats["cost"]["electricity"] == pytest.approx(5.0)
    assert stats["cost"]["projected_month"] is None
    assert stats["cost"]["api_equivalent"]["big"]["projected_month_saving_usd"] is None


def test_a_window_longer_than_the_energy_history_does_not_report_all_time_energy() -> None:
    day = 86_400.0
    book = StatsBook(energy_history_s=day, started_s=0.0)
    for hour in range(3 * 24 + 1):  # a steady 100 W for 3 days, noted every hour
        book.note_energy(hour * 3600.0, EnergyTotals(100.0 * hour * 3600, 0.0, 100.0 * hour * 3600, 0.0))
    now = ok_snapshot(100.0 * 3 * day, 0.0, 100.0 * 3 * day, 0.0)
    stats = build_stats(book, inputs(now), 2 * day, 3 * day)
    window_j = stats["energy"]["total_j"]
    # 2 days at 100 W is 17.28 MJ; the meter's 3-day total (25.92 MJ) must not be reported as the window's.
    assert window_j is None or window_j <= 100.0 * 2 * day


# --- several replicas -----------------------------------------------------------------------

R1, R2 = "http://gpu1:8001", "http://gpu2:8001"


def replica_status(url: str, healthy: bool = True, outstanding: int = 0, reason: str | None = None) -> dict:
    """One entry of `Balancer.status()`."""
    return {"url": url, "healthy": healthy, "outstanding": outstanding, "requests": 0, "failures": 0, "reason": reason}


def replicas_book() -> StatsBook:
    book = StatsBook(started_s=0.0)
    for finished_s, upstream, ok, ttft in [
        (100.0, R1, True, 40.0),  # before the window below
        (600.0, R1, True, 10.0),
        (700.0, R1, True, 30.0),
        (800.0, R2, False, None),
        (850.0, R2, True, 80.0),
        (900.0, "gateway", False, None),  # refused by the gateway: no replica's
    ]:
        book.add(replace(finished(finished_s, ok=ok, ttft=ttft), upstream=upstream))
    return book


def replicas_inputs() -> StatsInputs:
    load = {"url": f"{R1}, {R2}", "running": 3, "waiting": 0, "kv_cache_usage": 0.5, "error": None}
    loads = [
        {"url": R1, "running": 2, "waiting": 0, "kv_cache_usage": 0.5, "error": None},
        {"url": R2, "running": 1, "waiting": 0, "kv_cache_usage": 0.25, "error": None},
    ]
    return replace(
        inputs(unavailable()),
        upstream={**load, "replicas": loads},
        replicas=[replica_status(R1, outstanding=2), replica_status(R2, False, 1, f"upstream {R2} unreachable")],
    )


def test_each_replica_gets_its_state_counts_ttft_and_vllm_load() -> None:
    stats = build_stats(replicas_book(), replicas_inputs(), None, 1000.0)
    assert stats["upstream"] == {"url": f"{R1}, {R2}", "running": 3, "waiting": 0, "kv_cache_usage": 0.5, "error": None}
    first, second = stats["upstreams"]
    assert first["url"] == R1 and first["healthy"] and first["reason"] is None and first["outstanding"] == 2
    assert first["requests"] == {"total": 3, "ok": 3, "error": 0}
    assert first["ttft_ms"] == pytest.approx({"count": 3, "p50": 30.0, "p95": 39.0, "p99": 39.8})
    assert first["vllm"] == {"running": 2, "waiting": 0, "kv_cache_usage": 0.5, "error": None}
    assert (second["healthy"], second["reason"], second["outstanding"]) == (False, f"upstream {R2} unreachable", 1)
    assert second["requests"] == {"total": 2, "ok": 1, "error": 1}
    assert second["ttft_ms"]["p50"] == 80.0
    assert stats["requests"]["total"] == 6  # the gateway's own refusal counts overall only


def test_replica_counts_in_a_window_and_all_time_after_retention_dropped_requests() -> None:
    stats = build_stats(replicas_book(), replicas_inputs(), 500.0, 1000.0)
    assert [entry["requests"]["total"] for entry in stats["upstreams"]] == [2, 2]
    assert stats["upstreams"][0]["ttft_ms"]["count"] == 2
    small = StatsBook(retention=100, started_s=0.0)
    for index in range(150):
        small.add(replace(finished(float(index)), upstream=R1))
    stats = build_stats(small, replicas_inputs(), None, 200.0)
    assert stats["upstreams"][0]["requests"] == {"total": 150, "ok": 150, "error": 0}
    assert stats["upstreams"][0]["ttft_ms"]["count"] == 0  # these had no first token


def test_without_replicas_the_block_is_empty_and_upstream_unchanged() -> None:
    stats = build_stats(replicas_book(), inputs(unavailable()), None, 1000.0)
    assert stats["upstreams"] == [] and stats["upstream"] == {"running": 1}


# --- hybrid routing: per route ----------------------------------------------------------


def test_routes_have_their_own_counts_tokens_reasons_and_cost() -> None:
    book = StatsBook(started_s=0.0)
    book.add(replace(finished(100.0, prompt=100, completion=50, energy=30.0), route_reason="default"))
    book.add(replace(finished(200.0, prompt=10, completion=0, energy=None, ok=False), route_reason="header"))
    for at_s, reason in ((300.0, "keyword:tại sao"), (400.0, "keyword:tại sao"), (700.0, "fallback:capacity")):
        remote_usd = (1000 * 2.0 + 500 * 8.0) / 1e6
        book.add(
            replace(finished(at_s, prompt=1000, completion=500), routed_to="remote", route_reason=reason,
                    remote_cost_usd=remote_usd)
        )  # fmt: skip
    remote_view = {"url": "https://api.example", "model": "deepseek-chat", "price": {"input_usd_per_mtok": 2.0}}
    stats = build_stats(
        book, replace(inputs(ok_snapshot(10_000.0, 3000.0, 6500.0, 500.0)), remote=remote_view), None, 1000.0
    )
    local, remote = stats["routes"]["local"], stats["routes"]["remote"]
    assert local["requests"] == {"total": 2, "ok": 1, "error": 1}
    assert local["tokens"] == {"prompt": 110, "completion": 50}
    assert local["reasons"] == {"default": 1, "header": 1}
    assert local["energy_j"] == 30.0
    assert local["cost"] == pytest.approx({"currency": "VND", "electricity": vnd(30.0), "usd": vnd(30.0) / 25_000})
    assert remote["url"] == "https://api.example" and remote["model"] == "deepseek-chat"
    assert remote["requests"] == {"total": 3, "ok": 3, "error": 0}
    assert remote["reasons"] == {"fallback:capacity": 1, "keyword:tại sao": 2}
    assert remote["cost"]["usd"] == pytest.approx(3 * 0.006)
    # All the tokens priced on an API, minus what was spent: electricity (idle included) and the remote.
    cost = stats["cost"]
    assert cost["remote_usd"] == pytest.approx(0.018)
    big = cost["api_equivalent"]["big"]
    assert big["saving_usd"] == pytest.approx(big["cost_usd"] - cost["electricity_usd"] - 0.018)
    assert cost["projected_month_remote_usd"] == pytest.approx(0.018 / 5 * cost["requests_per_day"] * 30)

    window = build_stats(book, inputs(unavailable()), 350.0, 1000.0)["routes"]  # from 650 s: one remote request
    assert window["remote"]["requests"]["total"] == 1 and window["remote"]["cost"]["usd"] == pytest.approx(0.006)
    assert window["local"]["requests"]["total"] == 0 and window["local"]["cost"]["electricity"] is None


def test_without_a_remote_only_the_local_route_is_shown() -> None:
    book = StatsBook(started_s=0.0)
    book.add(finished(100.0, energy=None))
    stats = build_stats(book, inputs(unavailable()), None, 1000.0)
    assert list(stats["routes"]) == ["local"] and stats["routes"]["local"]["reasons"] == {}
    assert stats["routes"]["local"]["energy_j"] is None and stats["cost"]["remote_usd"] == 0.0


# --- energy per replica -------------------------------------------------------------------------


def dcgm_unavailable() -> EnergySnapshot:
    return replace(
        unavailable(), source="dcgm", reason="DCGM exporter http://gpu2:9400/metrics unreachable: connection refused"
    )


def per_replica_inputs(second: EnergySnapshot) -> StatsInputs:
    first = ok_snapshot(10_000.0, 3500.0, 6500.0, 500.0)
    meters = [
        MeterEnergy(R1, (R1,), "http://gpu1:9400/metrics", first),
        MeterEnergy(R2, (R2,), "http://gpu2:9400/metrics", second),
    ]
    combined = combined_snapshot([(R1, first), (R2, second)])
    return replace(inputs(combined), meters=meters, replicas=[replica_status(R1), replica_status(R2)])


def test_each_replica_has_its_own_energy_and_the_top_level_is_their_sum() -> None:
    second_meter = ok_snapshot(2000.0, 1100.0, 900.0, 100.0)
    stats = build_stats(StatsBook(started_s=0.0), per_replica_inputs(second_meter), None, 100.0)
    energy = stats["energy"]
    first, second = energy["replicas"]
    assert (first["urls"], first["exporter"], first["status"]) == ([R1], "http://gpu1:9400/metrics", "ok")
    assert (first["total_j"], first["attributed_j"], first["idle_j"], first["unattributed_j"]) == (
        10_000.0,
        3000.0,
        6500.0,
        500.0,
    )
    for part in (first, second):  # conserved per replica: attributed + unattributed + idle = total
        assert part["attributed_j"] + part["unattributed_j"] + part["idle_j"] == pytest.approx(part["total_j"])
        assert part["electricity"] == pytest.approx(vnd(part["total_j"]))
    assert (energy["status"], energy["total_j"], energy["idle_j"]) == ("ok", 12_000.0, 7400.0)
    assert energy["kwh"] == pytest.approx(12_000.0 / 3_600_000)
    assert stats["cost"]["electricity"] == pytest.approx(vnd(12_000.0))


def test_a_replica_whose_exporter_fails_is_unavailable_with_its_reason_and_left_out_of_the_sum() -> None:
    stats = build_stats(StatsBook(started_s=0.0), per_replica_inputs(dcgm_unavailable()), None, 100.0)
    energy = stats["energy"]
    second = energy["replicas"][1]
    assert (second["status"], second["total_j"], second["electricity"]) == ("unavailable", None, None)
    assert second["reason"] == "DCGM exporter http://gpu2:9400/metrics unreachable: connection refused"
    assert (energy["status"], energy["total_j"]) == ("ok", 10_000.0)
    assert energy["reason"].startswith(f"measured on 1 of 2 meters; not measured: {R2}: DCGM exporter")

    down = per_replica_inputs(dcgm_unavailable())
    nothing = replace(
        down,
        energy=combined_snapshot([(R1, unavailable()), (R2, dcgm_unavailable())]),
        meters=[replace(down.meters[0], snapshot=unavailable()), down.meters[1]],
    )
    energy = build_stats(StatsBook(started_s=0.0), nothing, None, 100.0)["energy"]
    assert (energy["status"], energy["total_j"], energy["kwh"]) == ("unavailable", None, None)


def test_window_energy_is_each_meters_own_difference() -> None:
    book = StatsBook(started_s=0.0)
    book.note_energy(400.0, EnergyTotals(4000.0, 1000.0, 2800.0, 200.0), R1)
    book.note_energy(400.0, EnergyTotals(500.0, 100.0, 400.0, 0.0), R2)
    stats = build_stats(book, per_replica_inputs(ok_snapshot(2000.0, 1100.0, 900.0, 100.0)), 500.0, 1000.0)
    first, second = stats["energy"]["replicas"]
    assert (first["total_j"], second["total_j"]) == (6000.0, 1500.0)
    assert stats["energy"]["total_j"] == 7500.0
    unnoted = EnergyTotals(10.0, 0.0, 10.0, 0.0)
    assert book.energy_since(450.0, unnoted, LOCAL_METER) == unnoted  # another meter's history is its own


def test_one_meter_for_all_replicas_lists_them() -> None:
    stats = build_stats(replicas_book(), replicas_inputs(), None, 1000.0)
    (local,) = stats["energy"]["replicas"]
    assert (local["urls"], local["exporter"], local["status"]) == ([R1, R2], None, "unavailable")
