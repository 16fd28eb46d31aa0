"""`GET /metrics` text, parsed back with prometheus-client's own parser."""

from __future__ import annotations

from dataclasses import replace

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.accounting.tariff import ApiPrice
from server.control.admission import Slots
from server.telemetry.energy_attribution import EnergyMeter, EnergySnapshot
from server.telemetry.metrics import GatewayMetrics, LiveFigures
from server.telemetry.power_sources import UnavailableSource
from server.telemetry.request_record import RequestRecord

CHAT = ("/v1/chat/completions", "vllm")


class Live:
    """The state a scrape reads; tests change `figures` between scrapes."""

    def __init__(self, figures: LiveFigures):
        self.figures = figures

    def __call__(self) -> LiveFigures:
        return self.figures


def unavailable_figures(in_flight: int = 0, tokens_per_s: float = 0.0) -> LiveFigures:
    snapshot = EnergyMeter(UnavailableSource("no NVML or RAPL on this machine")).snapshot()
    return LiveFigures(snapshot, None, "VND", in_flight, tokens_per_s)


def ok_snapshot(power_w: float | None = 145.5, idle_w: float | None = 60.0) -> EnergySnapshot:
    return EnergySnapshot(
        status="ok",
        reason="reading NVML",
        source="nvml",
        total_j=5000.0,
        active_j=1200.0,
        attributed_j=1100.0,
        idle_j=3800.0,
        unattributed_j=100.0,
        power_w=power_w,
        idle_w=idle_w,
        idle_measuring=False,
        requests_in_flight=1,
        intervals=500,
        resets=0,
        gaps=0,
    )


def scrape(metrics: GatewayMetrics) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample named `name` with exactly these labels."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def names(samples: list[Sample]) -> set[str]:
    return {s.name for s in samples}


def record(
    status: int = 200,
    *,
    route: str = CHAT[0],
    upstream: str = CHAT[1],
    ttft_s: float | None = 0.05,
    e2e_s: float = 0.5,
    prompt: int | None = 10,
    completion: int | None = 11,
    energy_j: float | None = None,
    key_name: str | None = None,
) -> RequestRecord:
    """A finished request: started at 100 s, first token `ttft_s` later, done `e2e_s` after the start."""
    return RequestRecord(
        route=route,
        upstream=upstream,
        stream=ttft_s is not None,
        started_s=100.0,
        first_token_s=None if ttft_s is None else 100.0 + ttft_s,
        finished_s=100.0 + e2e_s,
        status=status,
        prompt_tokens=prompt,
        completion_tokens=completion,
        energy_j=energy_j,
        key_name=key_name,
    )


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(Live(unavailable_figures()))


# --- per-request figures ----------------------------------------------------------------


def test_requests_are_counted_by_route_upstream_and_status(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200))
    metrics.observe(record(200))
    metrics.observe(record(503))
    metrics.observe(record(200, route="/v1/completions", upstream="other"))
    samples = scrape(metrics)
    assert value(samples, "student_requests_total", route=CHAT[0], upstream=CHAT[1], status="200") == 2
    assert value(samples, "student_requests_total", route=CHAT[0], upstream=CHAT[1], status="503") == 1
    assert value(samples, "student_requests_total", route="/v1/completions", upstream="other", status="200") == 1


def test_tokens_are_counted_including_those_of_errors(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200, prompt=10, completion=11))
    metrics.observe(record(200, prompt=5, completion=None))
    metrics.observe(record(500, prompt=7, completion=0))
    samples = scrape(metrics)
    assert value(samples, "student_prompt_tokens_total", route=CHAT[0], upstream=CHAT[1]) == 22
    assert value(samples, "student_completion_tokens_total", route=CHAT[0], upstream=CHAT[1]) == 11


def test_request_energy_is_counted_only_when_measured(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200, energy_j=None))
    assert "student_request_energy_joules_total" not in names(scrape(metrics))
    metrics.observe(record(200, energy_j=2.5))
    metrics.observe(record(200, energy_j=1.5))
    assert value(scrape(metrics), "student_request_energy_joules_total", route=CHAT[0], upstream=CHAT[1]) == 4.0


def test_latency_histograms_are_in_seconds(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200, ttft_s=0.05, e2e_s=0.5, completion=11))  # TPOT (0.5 - 0.05) / 10 = 45 ms
    samples = scrape(metrics)
    labels = {"route": CHAT[0], "upstream": CHAT[1]}
    assert value(samples, "student_e2e_request_latency_seconds_sum", **labels) == pytest.approx(0.5)
    assert value(samples, "student_e2e_request_latency_seconds_bucket", le="0.25", **labels) == 0
    assert value(samples, "student_e2e_request_latency_seconds_bucket", le="0.5", **labels) == 1
    assert value(samples, "student_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.05)
    assert value(samples, "student_time_to_first_token_seconds_bucket", le="0.05", **labels) == 1
    assert value(samples, "student_time_to_first_token_seconds_bucket", le="0.025", **labels) == 0
    assert value(samples, "student_time_per_output_token_seconds_sum", **labels) == pytest.approx(0.045)
    assert value(samples, "student_time_per_output_token_seconds_bucket", le="0.04", **labels) == 0
    assert value(samples, "student_time_per_output_token_seconds_bucket", le="0.05", **labels) == 1


def test_errors_do_not_feed_the_histograms_and_ttft_only_when_present(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200, ttft_s=0.05))
    metrics.observe(record(200, ttft_s=None, completion=1))  # a whole answer: no first token, no TPOT
    metrics.observe(record(500, ttft_s=0.02, e2e_s=0.03))
    metrics.observe(record(404, ttft_s=None, e2e_s=0.01))
    samples = scrape(metrics)
    labels = {"route": CHAT[0], "upstream": CHAT[1]}
    assert value(samples, "student_e2e_request_latency_seconds_count", **labels) == 2
    assert value(samples, "student_e2e_request_latency_seconds_sum", **labels) == pytest.approx(1.0)
    assert value(samples, "student_time_to_first_token_seconds_count", **labels) == 1
    assert value(samples, "student_time_per_output_token_seconds_count", **labels) == 1


# --- live figures -----------------------------------------------------------------------


def test_unavailable_energy_says_why_and_has_no_energy_series() -> None:
    metrics = GatewayMetrics(Live(unavailable_figures()))
    samples = scrape(metrics)
    assert value(samples, "student_energy_measured") == 0
    assert (
        value(
            samples,
            "student_energy_info",
            source="unavailable",
            status="unavailable",
            reason="no NVML or RAPL on this machine",
        )
        == 1
    )
    absent = {
        n
        for n in names(samples)
        if n.startswith(
            ("student_energy_joules", "student_power_watts", "student_idle_power_watts", "student_electricity_cost")
        )
    }
    assert absent == set()


def test_measured_energy_is_exposed_by_kind_with_its_cost_and_power() -> None:
    metrics = GatewayMetrics(Live(LiveFigures(ok_snapshot(), 2.5, "VND", 0, 0.0)))
    samples = scrape(metrics)
    assert value(samples, "student_energy_measured") == 1
    assert value(samples, "student_energy_info", source="nvml", status="ok", reason="reading NVML") == 1
    joules = {
        kind: value(samples, "student_energy_joules_total", kind=kind)
        for kind in ("total", "active", "idle", "unattributed")
    }
    assert joules == {"total": 5000.0, "active": 1200.0, "idle": 3800.0, "unattributed": 100.0}
    assert value(samples, "student_electricity_cost_total", currency="VND") == 2.5
    assert value(samples, "student_power_watts") == 145.5
    assert value(samples, "student_idle_power_watts") == 60.0


def test_unknown_power_and_cost_are_left_out_not_zero() -> None:
    metrics = GatewayMetrics(Live(LiveFigures(ok_snapshot(power_w=None, idle_w=None), None, "VND", 0, 0.0)))
    present = names(scrape(metrics))
    assert "student_energy_joules_total" in present
    assert not present & {"student_power_watts", "student_idle_power_watts", "student_electricity_cost_total"}


def test_live_gauges_are_read_at_every_scrape() -> None:
    live = Live(unavailable_figures(in_flight=3, tokens_per_s=12.5))
    metrics = GatewayMetrics(live)
    samples = scrape(metrics)
    assert value(samples, "student_requests_in_flight") == 3
    assert value(samples, "student_completion_tokens_per_second") == 12.5

    live.figures = replace(live.figures, in_flight=0, completion_tokens_per_s=0.0)
    samples = scrape(metrics)
    assert value(samples, "student_requests_in_flight") == 0
    assert value(samples, "student_completion_tokens_per_second") == 0


def test_energy_becoming_unavailable_removes_its_series() -> None:
    live = Live(LiveFigures(ok_snapshot(), 2.5, "VND", 0, 0.0))
    metrics = GatewayMetrics(live)
    assert "student_power_watts" in names(scrape(metrics))
    live.figures = unavailable_figures()
    samples = scrape(metrics)
    assert value(samples, "student_energy_measured") == 0
    assert "student_power_watts" not in names(samples)
    assert "student_energy_joules_total" not in names(samples)


# --- isolation --------------------------------------------------------------------------


def test_two_gateways_share_no_state_and_leave_the_global_registry_alone() -> None:
    first = GatewayMetrics(Live(unavailable_figures(in_flight=1)))
    second = GatewayMetrics(Live(unavailable_figures(in_flight=7)))
    first.observe(record(200, prompt=10))

    assert value(scrape(first), "student_prompt_tokens_total", route=CHAT[0], upstream=CHAT[1]) == 10
    assert "student_prompt_tokens_total" not in names(scrape(second))
    assert value(scrape(second), "student_requests_in_flight") == 7
    assert b"student_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# --- several replicas -------------------------------------------------------------------------


def test_each_replica_has_a_health_and_an_outstanding_gauge_read_at_scrape_time() -> None:
    metrics = GatewayMetrics(Live(unavailable_figures()))
    status = [
        {"url": "http://gpu1:8001", "healthy": True, "outstanding": 3, "requests": 9, "failures": 0, "reason": None},
        {"url": "http://gpu2:8001", "healthy": False, "outstanding": 0, "requests": 4, "failures": 3, "reason": "down"},
    ]
    metrics.add_replicas(lambda: status)
    samples = scrape(metrics)
    assert value(samples, "student_upstream_healthy", upstream="http://gpu1:8001") == 1
    assert value(samples, "student_upstream_healthy", upstream="http://gpu2:8001") == 0
    assert value(samples, "student_upstream_outstanding_requests", upstream="http://gpu1:8001") == 3
    status[1] = {**status[1], "healthy": True, "outstanding": 1}
    samples = scrape(metrics)
    assert value(samples, "student_upstream_healthy", upstream="http://gpu2:8001") == 1
    assert value(samples, "student_upstream_outstanding_requests", upstream="http://gpu2:8001") == 1


def test_requests_are_labelled_by_replica_and_the_gateways_own_refusals(metrics: GatewayMetrics) -> None:
    for upstream in ("http://gpu1:8001", "http://gpu2:8001", "http://gpu1:8001", "gateway"):
        metrics.observe(record(200 if upstream != "gateway" else 400, upstream=upstream))
    samples = scrape(metrics)
    assert value(samples, "student_requests_total", route=CHAT[0], upstream="http://gpu1:8001", status="200") == 2
    assert value(samples, "student_requests_total", route=CHAT[0], upstream="http://gpu2:8001", status="200") == 1
    assert value(samples, "student_requests_total", route=CHAT[0], upstream="gateway", status="400") == 1
    upstreams = {s.labels["upstream"] for s in samples if s.name == "student_requests_total"}
    assert upstreams == {"http://gpu1:8001", "http://gpu2:8001", "gateway"}


def test_routes_are_counted_with_their_reason_tokens_and_cost(metrics: GatewayMetrics) -> None:
    local = record(200, energy_j=4.0)
    local.route_reason = "default"
    remote = record(200, upstream="https://api.example", prompt=1000, completion=500)
    remote.routed_to, remote.route_reason = "remote", "keyword:tại sao"
    metrics.observe(local, 0.0001)
    metrics.observe(remote, 0.006)
    metrics.observe(remote, 0.006)
    metrics.observe(record(200), None)  # energy not measured: no cost, still counted
    samples = scrape(metrics)
    assert value(samples, "student_routed_requests_total", routed_to="local", reason="default") == 1
    assert value(samples, "student_routed_requests_total", routed_to="local", reason="none") == 1
    assert value(samples, "student_routed_requests_total", routed_to="remote", reason="keyword:tại sao") == 2
    assert value(samples, "student_routed_tokens_total", routed_to="remote", kind="prompt") == 2000
    assert value(samples, "student_routed_tokens_total", routed_to="remote", kind="completion") == 1000
    assert value(samples, "student_route_cost_usd_total", routed_to="remote") == pytest.approx(0.012)
    assert value(samples, "student_route_cost_usd_total", routed_to="local") == pytest.approx(0.0001)


# --- admission control, power cap, keys, API equivalent ------------------------------------------


def test_admission_line_and_refusals_by_reason_are_read_at_scrape_time(metrics: GatewayMetrics) -> None:
    slots = Slots(max_in_flight=2, max_queue=3)
    metrics.add_admission(slots)
    samples = scrape(metrics)
    assert value(samples, "student_admission_max_in_flight_requests") == 2
    assert value(samples, "student_admission_max_queue_requests") == 3
    assert value(samples, "student_admission_answering_requests") == 0
    assert value(samples, "student_admission_waiting_requests") == 0
    # Both reasons exist from the start, so rate() over them is 0 rather than absent.
    assert value(samples, "student_admission_rejected_requests_total", reason="queue_full") == 0
    assert value(samples, "student_admission_rejected_requests_total", reason="upstream_not_ready") == 0

    slots.in_flight, slots.waiting = 2, 3
    slots.refusals["queue_full"] += 4
    slots.refusals["upstream_not_ready"] += 1
    samples = scrape(metrics)
    assert value(samples, "student_admission_answering_requests") == 2
    assert value(samples, "student_admission_waiting_requests") == 3
    assert value(samples, "student_admission_rejected_requests_total", reason="queue_full") == 4
    assert value(samples, "student_admission_rejected_requests_total", reason="upstream_not_ready") == 1
    assert slots.status()["rejected"] == 5  # /stats keeps the sum


def test_power_limit_is_exported_only_when_readable(metrics: GatewayMetrics) -> None:
    limit: list[float | None] = [None]
    metrics.add_power_limit(lambda: limit[0])
    assert "student_power_limit_watts" not in names(scrape(metrics))
    limit[0] = 450.0
    assert value(scrape(metrics), "student_power_limit_watts") == 450.0


def test_requests_and_tokens_are_counted_by_key_name(metrics: GatewayMetrics) -> None:
    metrics.observe(record(200, prompt=10, completion=11, key_name="shop"))
    metrics.observe(record(500, prompt=3, completion=0, key_name="shop"))
    metrics.observe(record(200, prompt=1, completion=2))  # no keys configured
    samples = scrape(metrics)
    assert value(samples, "student_key_requests_total", key="shop") == 2
    assert value(samples, "student_key_requests_total", key="anonymous") == 1
    assert value(samples, "student_key_tokens_total", key="shop", kind="prompt") == 13
    assert value(samples, "student_key_tokens_total", key="shop", kind="completion") == 11
    assert value(samples, "student_key_tokens_total", key="anonymous", kind="completion") == 2


def test_api_equivalent_cost_is_counted_per_priced_model(metrics: GatewayMetrics) -> None:
    assert "student_api_equivalent_cost_usd_total" not in names(scrape(metrics))  # no prices: no series
    metrics.add_api_prices({
        "cheap": ApiPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
        "dear": ApiPrice(input_usd_per_mtok=10.0, output_usd_per_mtok=10.0),
    })  # fmt: skip
    assert value(scrape(metrics), "student_api_equivalent_cost_usd_total", model="cheap") == 0
    metrics.observe(record(200, prompt=1000, completion=500))
    metrics.observe(record(200, prompt=None, completion=None))
    samples = scrape(metrics)
    assert value(samples, "student_api_equivalent_cost_usd_total", model="cheap") == pytest.approx(0.002)
    assert value(samples, "student_api_equivalent_cost_usd_total", model="dear") == pytest.approx(0.015)
