"""The numbers behind `GET /stats`: counts, tokens, latency percentiles, energy and money.

All-time counts (requests, tokens, API-equivalent cost) are exact counters. Percentiles and
`?window=SECONDS` figures come from the most recent finished requests kept in memory
(`stats_retention`, 100,000 by default). Window energy comes from each meter's totals, noted
once a second. Latency percentiles cover successful requests only; errors are counted apart.

Energy per replica: `energy.replicas` has one entry per meter (a replica with its own DCGM
exporter, or this host's devices shared by the replicas without one), each with its own totals,
status and reason; the top-level figures are their sum over the meters that measure.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.accounting.energy_units import kwh
from server.accounting.tariff import ApiPrice, Tariff, projected_month
from server.telemetry.energy_attribution import LOCAL_METER, EnergySnapshot
from server.telemetry.percentiles import percentiles

SECONDS_PER_DAY = 86_400.0
MAX_WINDOW_S = SECONDS_PER_DAY  # longer spans: `student report`, from the ledger
DAYS_PER_MONTH = 30.0


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """What /stats keeps of one finished request (no text). Times are monotonic seconds."""

    finished_s: float
    ok: bool
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float
    energy_j: float | None
    api_cost_usd: Mapping[str, float]
    upstream: str = ""  # the replica's base URL, or "gateway" when the gateway refused it
    routed_to: str = "local"  # hybrid routing: "local" or "remote"
    route_reason: str | None = None
    remote_cost_usd: float | None = None  # remote requests: tokens × the remote's price


@dataclass
class RouteTally:
    """One route's finished requests: counts, tokens, its own cost, and why they went there."""

    total: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    energy_j: float | None = None  # attributed to its requests; None while none was measured
    remote_cost_usd: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, request: FinishedRequest) -> None:
        self.total += 1
        self.ok += request.ok
        self.prompt_tokens += request.prompt_tokens
        self.completion_tokens += request.completion_tokens
        if request.energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + request.energy_j
        self.remote_cost_usd += request.remote_cost_usd or 0.0
        if request.route_reason is not None:
            self.reasons[request.route_reason] = self.reasons.get(request.route_reason, 0) + 1

    @staticmethod
    def of(requests: Iterable[FinishedRequest]) -> dict[str, RouteTally]:
        tallies: dict[str, RouteTally] = {}
        for request in requests:
            tallies.setdefault(request.routed_to, RouteTally()).add(request)
        return tallies


@dataclass(frozen=True, slots=True)
class EnergyTotals:
    """The meter's cumulative joules at one moment."""

    total_j: float
    active_j: float
    idle_j: float
    unattributed_j: float

    @staticmethod
    def of(snapshot: EnergySnapshot) -> EnergyTotals | None:
        if snapshot.total_j is None:
            return None
        return EnergyTotals(
            snapshot.total_j, snapshot.active_j or 0.0, snapshot.idle_j or 0.0, snapshot.unattributed_j or 0.0
        )

    def minus(self, earlier: EnergyTotals) -> EnergyTotals:
        return EnergyTotals(
            self.total_j - earlier.total_j,
            self.active_j - earlier.active_j,
            self.idle_j - earlier.idle_j,
            self.unattributed_j - earlier.unattributed_j,
        )

    def plus(self, other: EnergyTotals) -> EnergyTotals:
        return EnergyTotals(
            self.total_j + other.total_j,
            self.active_j + other.active_j,
            self.idle_j + other.idle_j,
            self.unattributed_j + other.unattributed_j,
        )


ZERO_ENERGY = EnergyTotals(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class MeterEnergy:
    """One energy meter as /stats shows it: its key (`LOCAL_METER`, or the replica URL whose own
    exporter it reads), the replicas it measures, the exporter's URL, and its snapshot now."""

    key: str
    urls: tuple[str, ...]
    exporter: str | None
    snapshot: EnergySnapshot


@dataclass
class StatsBook:
    """Finished requests and energy history of one gateway process."""

    retention: int = 100_000
    energy_history_s: float = MAX_WINDOW_S + 60.0
    started_s: float = field(default_factory=time.monotonic)
    total: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    api_cost_usd: dict[str, float] = field(default_factory=dict)
    by_upstream: dict[str, list[int]] = field(default_factory=dict)  # upstream -> [total, ok]
    by_route: dict[str, RouteTally] = field(default_factory=dict)  # "local" / "remote" -> its tally
    _recent: deque[FinishedRequest] = field(init=False)
    _energy: dict[str, deque[tuple[float, EnergyTotals]]] = field(default_factory=dict)  # per meter key
    _energy_trimmed: set[str] = field(default_factory=set)  # meters whose oldest notes were dropped

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.retention)

    def add(self, request: FinishedRequest) -> None:
        self.total += 1
        self.ok += request.ok
        self.prompt_tokens += request.prompt_tokens
        self.completion_tokens += request.completion_tokens
        for name, cost in request.api_cost_usd.items():
            self.api_cost_usd[name] = self.api_cost_usd.get(name, 0.0) + cost
        counts = self.by_upstream.get(request.upstream)
        if counts is None:
            counts = self.by_upstream[request.upstream] = [0, 0]
        counts[0] += 1
        counts[1] += request.ok
        tally = self.by_route.get(request.routed_to)
        if tally is None:
            tally = self.by_route[request.routed_to] = RouteTally()
        tally.add(request)
        self._recent.append(request)

    def note_energy(self, now_s: float, totals: EnergyTotals, meter: str = LOCAL_METER) -> None:
        """Remember a meter's totals at `now_s` (called about once a second, per meter)."""
        history = self._energy.setdefault(meter, deque())
        history.append((now_s, totals))
        while history and history[0][0] < now_s - self.energy_history_s:
            history.popleft()
            self._energy_trimmed.add(meter)

    def recent(self, since_s: float | None = None) -> list[FinishedRequest]:
        """Kept requests that finished at or after `since_s` (monotonic seconds; None: all kept)."""
        if since_s is None:
            return list(self._recent)
        found = []
        for request in reversed(self._recent):  # kept in finishing order: stop at the first older one
            if request.finished_s < since_s:
                break
            found.append(request)
        found.reverse()
        return found

    def energy_since(self, since_s: float, now: EnergyTotals, meter: str = LOCAL_METER) -> EnergyTotals | None:
        """A meter's energy used since `since_s`: `now` minus its last totals noted at or before it.

        None when history no longer reaches back that far (older notes were dropped).
        """
        base = ZERO_ENERGY if meter not in self._energy_trimmed else None
        for noted_s, totals in self._energy.get(meter, ()):
            if noted_s > since_s:
                break
            base = totals
        return None if base is None else now.minus(base)


@dataclass(frozen=True, slots=True)
class StatsInputs:
    """Everything /stats reports besides the book: the meter now, prices, vLLM's own gauges.

    `upstream` is vLLM's load (`UpstreamProxy.vllm_load`: all replicas, each one's under
    `replicas`); `replicas` is each replica's state in the gateway (`Balancer.status`). `energy`
    is all meters as one (`ReplicaMeters.snapshot`), `meters` each of them; without `meters`,
    `energy` is taken as the one meter of every replica.
    """

    energy: EnergySnapshot
    tariff: Tariff
    api_prices: Mapping[str, ApiPrice]
    in_flight: int
    upstream: dict[str, Any]
    power_limit_w: float | None = None
    replicas: Sequence[Mapping[str, Any]] = ()
    remote: Mapping[str, Any] | None = None  # the remote upstream (url, model, price), when one is configured
    meters: Sequence[MeterEnergy] = ()


def build_stats(book: StatsBook, inputs: StatsInputs, window_s: float | None, now_s: float) -> dict[str, Any]:
    """The /stats document (schema in the README) for the last `window_s` seconds or since start."""
    uptime_s = now_s - book.started_s
    span_s = uptime_s if window_s is None else min(window_s, uptime_s)
    requests = book.recent(None if window_s is None else now_s - span_s)
    if window_s is None:
        counts = {"total": book.total, "ok": book.ok, "error": book.total - book.ok}
        tokens = {"prompt": book.prompt_tokens, "completion": book.completion_tokens}
        api_cost = dict(book.api_cost_usd)
        tallies = book.by_route
    else:
        ok = sum(request.ok for request in requests)
        counts = {"total": len(requests), "ok": ok, "error": len(requests) - ok}
        tokens = {
            "prompt": sum(r.prompt_tokens for r in requests),
            "completion": sum(r.completion_tokens for r in requests),
        }
        api_cost = {name: sum(r.api_cost_usd.get(name, 0.0) for r in requests) for name in inputs.api_prices}
        tallies = RouteTally.of(requests)
    remote_usd = sum(tally.remote_cost_usd for tally in tallies.values())
    successful = [request for request in requests if request.ok]
    energy = _energy_block(book, inputs, window_s, now_s - span_s)
    upstream = dict(inputs.upstream)
    loads = upstream.pop("replicas", None) or ()
    energy["completion_tokens_per_j"] = tokens["completion"] / energy["total_j"] if energy["total_j"] else None
    return {
        "window_s": window_s,
        "uptime_s": uptime_s,
        "requests": {**counts, "in_flight": inputs.in_flight},
        "tokens": tokens,
        "throughput": {
            "requests_per_s": counts["total"] / span_s if span_s > 0 else None,
            "completion_tokens_per_s": tokens["completion"] / span_s if span_s > 0 else None,
        },
        "latency_ms": {
            "ttft": percentiles(r.ttft_ms for r in successful),
            "tpot": percentiles(r.tpot_ms for r in successful),
            "e2e": percentiles(r.e2e_ms for r in successful),
        },
        "energy": energy,
        "cost": _cost_block(inputs, energy, requests, counts["total"], span_s, api_cost, remote_usd),
        "routes": _routes_block(tallies, inputs),
        "upstream": upstream,
        "upstreams": _upstreams_block(book, inputs.replicas, loads, requests, window_s),
    }


def _upstreams_block(
    book: StatsBook,
    replicas: Sequence[Mapping[str, Any]],
    loads: Iterable[Mapping[str, Any]],
    requests: list[FinishedRequest],
    window_s: float | None,
) -> list[dict[str, Any]]:
    """Per replica: its state in the gateway, its finished requests and TTFT, vLLM's own load."""
    vllm = {load["url"]: {k: v for k, v in load.items() if k != "url"} for load in loads}
    mine: dict[str, list[FinishedRequest]] = {replica["url"]: [] for replica in replicas}
    for request in requests:
        found = mine.get(request.upstream)
        if found is not None:
            found.append(request)
    block = []
    for replica in replicas:
        url = replica["url"]
        if window_s is None:
            total, ok = book.by_upstream.get(url, (0, 0))
        else:
            total, ok = len(mine[url]), sum(request.ok for request in mine[url])
        block.append(
            {
                "url": url,
                "healthy": replica["healthy"],
                "reason": replica["reason"],
                "outstanding": replica["outstanding"],
                "requests": {"total": total, "ok": ok, "error": total - ok},
                "ttft_ms": percentiles(request.ttft_ms for request in mine[url] if request.ok),
                "vllm": vllm.get(url),
            }
        )
    return block


def _routes_block(tallies: Mapping[str, RouteTally], inputs: StatsInputs) -> dict[str, Any]:
    """Per route (`local` always; `remote` when configured or seen): requests, tokens, why, and
    the route's own cost: local the electricity of the energy attributed to its requests (idle
    not included: see `cost` for that), remote its tokens × the remote's price."""
    names = ["local", *(["remote"] if inputs.remote is not None else []), *sorted(tallies)]
    tariff = inputs.tariff
    block: dict[str, Any] = {}
    for name in dict.fromkeys(names):
        tally = tallies.get(name) or RouteTally()
        entry: dict[str, Any] = {
            "requests": {"total": tally.total, "ok": tally.ok, "error": tally.total - tally.ok},
            "tokens": {"prompt": tally.prompt_tokens, "completion": tally.completion_tokens},
            "reasons": dict(sorted(tally.reasons.items())),
        }
        if name == "remote":
            entry = {**(inputs.remote or {}), **entry, "cost": {"usd": tally.remote_cost_usd}}
        else:
            electricity = tariff.energy_cost(tally.energy_j)
            entry["energy_j"] = tally.energy_j
            entry["cost"] = {"currency": tariff.currency, "electricity": electricity, "usd": tariff.to_usd(electricity)}
        block[name] = entry
    return block


def _energy_block(book: StatsBook, inputs: StatsInputs, window_s: float | None, since_s: float) -> dict[str, Any]:
    """Energy over the window: the top-level figures (the sum over meters that measure, as the
    gateway always showed them) and `replicas`, each meter's own."""
    snapshot = inputs.energy
    block: dict[str, Any] = {
        "status": snapshot.status,
        "reason": snapshot.reason,
        "source": snapshot.source,
        "total_j": None,
        "active_j": None,
        "idle_j": None,
        "unattributed_j": None,
        "kwh": None,
        "power_w": snapshot.power_w,
        "idle_w": snapshot.idle_w,
        "idle_measuring": snapshot.idle_measuring,
        "wall_power_factor": inputs.tariff.wall_power_factor,
        "power_limit_w": inputs.power_limit_w,
    }
    meters = inputs.meters or (
        MeterEnergy(LOCAL_METER, tuple(replica["url"] for replica in inputs.replicas), None, snapshot),
    )
    used = [_meter_used(book, meter.key, meter.snapshot, window_s, since_s) for meter in meters]
    block["replicas"] = [
        _meter_entry(meter, part, book, inputs.tariff) for meter, part in zip(meters, used, strict=True)
    ]
    measured = [part for meter, part in zip(meters, used, strict=True) if EnergyTotals.of(meter.snapshot) is not None]
    if not measured:
        return block
    if None in measured:  # a measured meter's history does not reach back: a sum without it would look whole
        block["reason"] = _history_reason(book)
        return block
    total = ZERO_ENERGY
    for part in measured:
        total = total.plus(part or ZERO_ENERGY)
    block.update(
        total_j=total.total_j,
        active_j=total.active_j,
        idle_j=total.idle_j,
        unattributed_j=total.unattributed_j,
        kwh=kwh(total.total_j),
    )
    return block


def _history_reason(book: StatsBook) -> str:
    return f"energy history covers only the last {book.energy_history_s:.0f} s"


def _meter_used(
    book: StatsBook, key: str, snapshot: EnergySnapshot, window_s: float | None, since_s: float
) -> EnergyTotals | None:
    """A meter's energy over the window (all of it without one); None when not measured or too old."""
    now = EnergyTotals.of(snapshot)
    if now is None:
        return None
    return now if window_s is None else book.energy_since(since_s, now, key)


def _meter_entry(meter: MeterEnergy, used: EnergyTotals | None, book: StatsBook, tariff: Tariff) -> dict[str, Any]:
    """One meter's part of `energy.replicas`; conserved on its own: attributed + unattributed +
    idle = total (J)."""
    snapshot = meter.snapshot
    reason = snapshot.reason
    if used is None and EnergyTotals.of(snapshot) is not None:
        reason = _history_reason(book)
    return {
        "urls": list(meter.urls),
        "exporter": meter.exporter,
        "status": snapshot.status,
        "reason": reason,
        "source": snapshot.source,
        "total_j": None if used is None else used.total_j,
        "active_j": None if used is None else used.active_j,
        "attributed_j": None if used is None else used.active_j - used.unattributed_j,
        "idle_j": None if used is None else used.idle_j,
        "unattributed_j": None if used is None else used.unattributed_j,
        "kwh": None if used is None else kwh(used.total_j),
        "electricity": tariff.energy_cost(None if used is None else used.total_j),
        "power_w": snapshot.power_w,
        "idle_w": snapshot.idle_w,
        "idle_measuring": snapshot.idle_measuring,
        "gaps": snapshot.gaps,
        "resets": snapshot.resets,
    }


def _cost_block(
    inputs: StatsInputs,
    energy: dict[str, Any],
    requests: list[FinishedRequest],
    request_count: int,
    span_s: float,
    api_cost: dict[str, float],
    remote_usd: float = 0.0,
) -> dict[str, Any]:
    """Electricity (idle included), what was paid to the remote, and each hosted API's price for
    all the tokens: its saving is that price minus electricity minus the remote's cost."""
    tariff = inputs.tariff
    electricity = tariff.energy_cost(energy["total_j"])
    electricity_usd = tariff.to_usd(electricity)
    measured = [r.energy_j for r in requests if r.energy_j is not None]
    energy_per_request_j = sum(measured) / len(measured) if measured else None
    requests_per_day = request_count / span_s * SECONDS_PER_DAY if span_s > 0 else 0.0
    month = projected_month(energy["idle_w"], energy_per_request_j, requests_per_day, tariff, DAYS_PER_MONTH)
    month_usd = tariff.to_usd(month)
    month_remote_usd = (remote_usd / request_count if request_count else 0.0) * requests_per_day * DAYS_PER_MONTH
    spent_usd = None if electricity_usd is None else electricity_usd + remote_usd
    month_spent_usd = None if month_usd is None else month_usd + month_remote_usd
    return {
        "currency": tariff.currency,
        "price_per_kwh": tariff.price_per_kwh,
        "usd_rate": tariff.usd_rate,
        "wall_power_factor": tariff.wall_power_factor,
        "electricity": electricity,
        "electricity_usd": electricity_usd,
        "per_request": tariff.energy_cost(energy_per_request_j),
        "requests_per_day": requests_per_day,
        "projected_month": month,
        "projected_month_usd": month_usd,
        "remote_usd": remote_usd,
        "projected_month_remote_usd": month_remote_usd,
        "api_equivalent": {
            name: _api_block(api_cost.get(name, 0.0), request_count, requests_per_day, spent_usd, month_spent_usd)
            for name in inputs.api_prices
        },
    }


def _api_block(
    cost_usd: float,
    request_count: int,
    requests_per_day: float,
    spent_usd: float | None,
    month_spent_usd: float | None,
) -> dict[str, float | None]:
    """An API's cost for the same tokens, its month at the observed rate, and the savings (USD)
    against what was spent: electricity plus the remote's cost."""
    per_request_usd = cost_usd / request_count if request_count else 0.0
    month_usd = per_request_usd * requests_per_day * DAYS_PER_MONTH
    return {
        "cost_usd": cost_usd,
        "saving_usd": None if spent_usd is None else cost_usd - spent_usd,
        "projected_month_usd": month_usd,
        "projected_month_saving_usd": None if month_spent_usd is None else month_usd - month_spent_usd,
    }
