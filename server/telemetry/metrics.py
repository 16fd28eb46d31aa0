"""`GET /metrics`: the gateway's Prometheus metrics, with prometheus-client.

Per-request figures are observed when a request finishes; energy, power, in-flight requests and
throughput are read from the live state at scrape time. Energy series are absent (not 0) while
energy is not measured; `student_energy_measured` and `student_energy_info` say why.

The `upstream` label is a replica's base URL, or "gateway" for requests the gateway refused
itself: as many values as `--upstream` replicas, plus one. Hybrid routing has series of its
own, labelled `routed_to` ("local" or "remote"; `route` is the endpoint path): requests by the
reason they went there, tokens, and each route's own cost in USD. `key` is the API key's name
(never the key), "anonymous" without keys: as many values as configured keys, plus one.

Names follow Prometheus' conventions: base units in the name (`_seconds`, `_joules`, `_watts`,
`_usd`; money in the configured currency says so in its `currency` label), `_total` on counters.
docs/monitoring.md lists every metric, and the renames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from server.accounting.tariff import ApiPrice, api_cost_usd
from server.telemetry.energy_attribution import EnergySnapshot
from server.telemetry.request_record import RequestRecord

# Seconds. Small local models answer in tens of ms; a queued long answer on a busy card in minutes.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
TPOT_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1,
    2.5,
)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)


@dataclass(frozen=True, slots=True)
class LiveFigures:
    """State read at scrape time. `electricity_cost` covers all measured energy (idle included)."""

    energy: EnergySnapshot
    electricity_cost: float | None
    currency: str
    in_flight: int
    completion_tokens_per_s: float


class AdmissionState(Protocol):
    """What admission control shows (`server.control.admission.Slots`), read at scrape time."""

    max_in_flight: int
    max_queue: int
    in_flight: int
    waiting: int
    refusals: Mapping[str, int]


class GatewayMetrics:
    """One registry per gateway (no process-wide globals), rendered by `render()`."""

    def __init__(self, live: Callable[[], LiveFigures]):
        self.registry = CollectorRegistry()
        labels = ("route", "upstream")
        self.requests = Counter(
            "student_requests", "Finished requests by HTTP status", (*labels, "status"), registry=self.registry
        )
        self.prompt_tokens = Counter(
            "student_prompt_tokens", "Prompt tokens (vLLM's usage)", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "student_completion_tokens", "Completion tokens (vLLM's usage)", labels, registry=self.registry
        )
        self.request_energy = Counter(
            "student_request_energy_joules", "Energy attributed to requests", labels, registry=self.registry
        )
        self.ttft = Histogram(
            "student_time_to_first_token_seconds",
            "Time to first token (streams)",
            labels,
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "student_time_per_output_token_seconds",
            "(end - first token) / (completion tokens - 1)",
            labels,
            buckets=TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "student_e2e_request_latency_seconds",
            "End-to-end request latency",
            labels,
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        )
        self.routed_requests = Counter(
            "student_routed_requests",
            "Finished requests by route (local/remote) and why they went there",
            ("routed_to", "reason"),
            registry=self.registry,
        )
        self.routed_tokens = Counter(
            "student_routed_tokens",
            "Tokens by route and kind (prompt/completion)",
            ("routed_to", "kind"),
            registry=self.registry,
        )
        self.route_cost_usd = Counter(
            "student_route_cost_usd",
            "Each route's own cost, USD: local the electricity attributed to its requests (only while measured), "
            "remote its tokens x the remote's price",
            ("routed_to",),
            registry=self.registry,
        )
        self.key_requests = Counter(
            "student_key_requests",
            "Finished requests by API key name (anonymous: no keys configured)",
            ("key",),
            registry=self.registry,
        )
        self.key_tokens = Counter(
            "student_key_tokens",
            "Tokens by API key name and kind (prompt/completion)",
            ("key", "kind"),
            registry=self.registry,
        )
        self.api_equivalent_cost_usd = Counter(
            "student_api_equivalent_cost_usd",
            "What each hosted API in the price table would have charged for the same tokens, USD",
            ("model",),
            registry=self.registry,
        )
        self._api_prices: Mapping[str, ApiPrice] = {}
        self.registry.register(_LiveCollector(live))

    def add_replicas(self, status: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """Export each replica's health and requests in flight (`Balancer.status`) at scrape time."""
        self.registry.register(_ReplicaCollector(status))

    def add_admission(self, state: AdmissionState) -> None:
        """Export admission control's line and refusals (`Slots`) at scrape time."""
        self.registry.register(_AdmissionCollector(state))

    def add_power_limit(self, read_w: Callable[[], float | None]) -> None:
        """Export the enforced power cap (W, summed over the measured GPUs) where it can be read."""
        self.registry.register(_PowerLimitCollector(read_w))

    def add_api_prices(self, prices: Mapping[str, ApiPrice]) -> None:
        """Count each finished request's API-equivalent cost at these prices (USD per 1M tokens)."""
        self._api_prices = dict(prices)
        for model in self._api_prices:
            self.api_equivalent_cost_usd.labels(model)  # every model has a series from the start

    def observe(self, record: RequestRecord, route_cost_usd: float | None = None) -> None:
        """Count one finished request (successful ones also feed the latency histograms).

        `route_cost_usd`: what it cost its route (None: unknown, e.g. energy not measured)."""
        routed_to = record.routed_to
        self.routed_requests.labels(routed_to, record.route_reason or "none").inc()
        self.routed_tokens.labels(routed_to, "prompt").inc(record.prompt_tokens or 0)
        self.routed_tokens.labels(routed_to, "completion").inc(record.completion_tokens or 0)
        if route_cost_usd is not None:
            self.route_cost_usd.labels(routed_to).inc(route_cost_usd)
        key = record.key_name or "anonymous"
        self.key_requests.labels(key).inc()
        self.key_tokens.labels(key, "prompt").inc(record.prompt_tokens or 0)
        self.key_tokens.labels(key, "completion").inc(record.completion_tokens or 0)
        for model, price in self._api_prices.items():
            self.api_equivalent_cost_usd.labels(model).inc(
                api_cost_usd(price, record.prompt_tokens, record.completion_tokens)
            )
        labels = (record.route, record.upstream)
        self.requests.labels(*labels, str(record.status)).inc()
        self.prompt_tokens.labels(*labels).inc(record.prompt_tokens or 0)
        self.completion_tokens.labels(*labels).inc(record.completion_tokens or 0)
        if record.energy_j is not None:
            self.request_energy.labels(*labels).inc(record.energy_j)
        if not record.ok:
            return
        for histogram, value_ms in (
            (self.ttft, record.ttft_ms),
            (self.tpot, record.tpot_ms),
            (self.e2e, record.e2e_ms),
        ):
            if value_ms is not None:
                histogram.labels(*labels).observe(value_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    def __init__(self, status: Callable[[], Iterable[Mapping[str, Any]]]):
        self._status = status

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "student_upstream_healthy", "1 while the replica takes requests, 0 while ejected", labels=["upstream"]
        )
        outstanding = GaugeMetricFamily(
            "student_upstream_outstanding_requests",
            "Requests in flight to the replica through this gateway",
            labels=["upstream"],
        )
        for replica in self._status():
            healthy.add_metric([replica["url"]], int(replica["healthy"]))
            outstanding.add_metric([replica["url"]], replica["outstanding"])
        yield healthy
        yield outstanding


class _AdmissionCollector(Collector):
    def __init__(self, state: AdmissionState):
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        yield GaugeMetricFamily(
            "student_admission_waiting_requests", "Generation requests waiting for a slot", value=state.waiting
        )
        yield GaugeMetricFamily(
            "student_admission_answering_requests",
            "Generation requests holding a slot (being answered)",
            value=state.in_flight,
        )
        yield GaugeMetricFamily(
            "student_admission_max_in_flight_requests",
            "Slots: answers allowed at once (--max-in-flight)",
            value=state.max_in_flight,
        )
        yield GaugeMetricFamily(
            "student_admission_max_queue_requests",
            "Requests allowed to wait for a slot (--max-queue)",
            value=state.max_queue,
        )
        refused = CounterMetricFamily(
            "student_admission_rejected_requests",
            "Requests refused at once, every slot and the line being full: queue_full (429) or, while the "
            "model server is not ready, upstream_not_ready (503)",
            labels=["reason"],
        )
        for reason, count in sorted(state.refusals.items()):
            refused.add_metric([reason], count)
        yield refused


class _PowerLimitCollector(Collector):
    def __init__(self, read_w: Callable[[], float | None]):
        self._read_w = read_w

    def collect(self) -> Iterator[Metric]:
        limit_w = self._read_w()
        if limit_w is not None:
            yield GaugeMetricFamily(
                "student_power_limit_watts", "Enforced power cap, summed over the measured GPUs (NVML)", value=limit_w
            )


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], LiveFigures]):
        self._live = live

    def collect(self) -> Iterator[Metric]:
        figures = self._live()
        energy = figures.energy
        measured = energy.status == "ok" and energy.total_j is not None
        yield GaugeMetricFamily("student_energy_measured", "1 when energy is measured, else 0", value=int(measured))
        info = InfoMetricFamily("student_energy", "Power source and, when unavailable, why")
        info.add_metric([], {"source": energy.source, "status": energy.status, "reason": energy.reason})
        yield info
        yield GaugeMetricFamily("student_requests_in_flight", "Requests being answered", value=figures.in_flight)
        yield GaugeMetricFamily(
            "student_completion_tokens_per_second",
            "Completion tokens per second, last 10 s",
            value=figures.completion_tokens_per_s,
        )
        if not measured:
            return
        joules = CounterMetricFamily("student_energy_joules", "Measured energy by part", labels=["kind"])
        for kind, value in (
            ("total", energy.total_j),
            ("active", energy.active_j),
            ("idle", energy.idle_j),
            ("unattributed", energy.unattributed_j),
        ):
            joules.add_metric([kind], value or 0.0)
        yield joules
        if figures.electricity_cost is not None:
            cost = CounterMetricFamily(
                "student_electricity_cost",
                "Electricity for all measured energy (idle included), in the `currency` label's unit",
                labels=["currency"],
            )
            cost.add_metric([figures.currency], figures.electricity_cost)
            yield cost
        if energy.power_w is not None:
            yield GaugeMetricFamily("student_power_watts", "Power now, all measured devices", value=energy.power_w)
        if energy.idle_w is not None:
            yield GaugeMetricFamily("student_idle_power_watts", "Idle baseline", value=energy.idle_w)
