"""Where every request's measurements go: the energy meter, /stats, /metrics, the ledger, the log.

Requests routed to the remote upstream (server/control/hybrid_routing.py) use no local energy: the meter never
sees them, and their cost is their tokens × the remote's price.

The proxy calls `begin` when a request is sent upstream, `token_sink` to report tokens as a
stream goes, and `finish` once, before the client receives the answer's last bytes: so a
request's ledger row is committed before its client can see it finished.

Energy per replica (`ReplicaMeters`): a request's energy comes from the meter of the replica that
serves it, `record.upstream`. The proxy calls `begin` before it picks the replica (and sets
`record.upstream` right after, in the same step of the event loop), so with several meters the
request joins its replica's meter in a callback scheduled by `begin`, and moves if the proxy
retries it on another replica. With one meter (no replica has an exporter: this host's NVML or
RAPL for all) it joins at `begin`, as it always did.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from server.accounting.ledger import EnergyRow, Ledger, RequestRow
from server.accounting.tariff import api_cost_usd, api_costs_usd
from server.runtime.settings import Settings
from server.telemetry.energy_attribution import LOCAL_METER, EnergyMeter, ReplicaMeters, combined_snapshot
from server.telemetry.metrics import GatewayMetrics, LiveFigures
from server.telemetry.request_record import RequestRecord, TokenSink, describe
from server.telemetry.stats import EnergyTotals, FinishedRequest, MeterEnergy, StatsBook, StatsInputs, build_stats

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0
ENERGY_NOTE_PERIOD_S = 1.0


class RequestRecorder:
    """The gateway's accounting. Runs on the event loop (the meter's own thread aside).

    `on_finish` (if given) is called with every finished record after it is accounted, before
    its client sees the end: e.g. to charge the key's tokens/minute limit. `meters`: one meter
    for every replica, or `ReplicaMeters` (see the module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        meters: EnergyMeter | ReplicaMeters,
        ledger: Ledger,
        on_finish: Callable[[RequestRecord], None] | None = None,
    ):
        self._settings = settings
        self._on_finish = on_finish
        self._tariff = settings.tariff
        self._remote_price = settings.remote_api_price
        self.meters = meters if isinstance(meters, ReplicaMeters) else ReplicaMeters.single(meters)
        self._ledger = ledger
        self.book = StatsBook(settings.stats_retention)
        self.metrics = GatewayMetrics(self._live_figures)
        self.in_flight = 0
        self.ledger_errors = 0
        # request id -> (the upstream it joined a meter for, that meter; energy from a replica tried before)
        self._joined: dict[int, tuple[str, EnergyMeter]] = {}
        self._carried_j: dict[int, float | None] = {}
        started_at = time.time()
        self._energy_rows_since: dict[str, tuple[float, EnergyTotals | None]] = {
            entry.key: (started_at, EnergyTotals.of(entry.meter.snapshot())) for entry in self.meters.meters
        }

    # --- a request's energy ---------------------------------------------------------------

    def begin(self, record: RequestRecord) -> None:
        """A request goes upstream. Streams report tokens as they go; whole answers cannot."""
        self.in_flight += 1
        if record.routed_to != "local":
            return
        only = self.meters.only
        if only is not None:
            self._join(record, only)
            return
        try:
            asyncio.get_running_loop().call_soon(self._join_replica, record)
        except RuntimeError:  # no event loop (a direct call): the upstream is as set now
            self._join_replica(record)

    def token_sink(self, record: RequestRecord) -> TokenSink | None:
        """Where a stream reports its tokens for energy attribution (None when not measuring)."""
        if not self.meters.tracking or record.routed_to != "local":
            return None
        return lambda tokens: self._add_tokens(record, tokens)

    def _join(self, record: RequestRecord, meter: EnergyMeter) -> None:
        if meter.tracking:
            meter.start_request(record.request_id, reports_tokens=record.stream)
            self._joined[record.request_id] = (record.upstream, meter)

    def _join_replica(self, record: RequestRecord) -> None:
        """Join the meter of the replica serving `record` (scheduled by `begin`), unless it is over."""
        if record.status is None and record.request_id not in self._joined:
            self._meter_of(record)

    def _meter_of(self, record: RequestRecord) -> EnergyMeter | None:
        """The meter measuring `record` now: its replica's; a request retried on another replica
        leaves the first one's meter (keeping what it used there) and joins the new one's."""
        joined = self._joined.get(record.request_id)
        if joined is not None and (joined[0] == record.upstream or self.meters.only is not None):
            return joined[1]
        meter = self.meters.for_upstream(record.upstream)
        if joined is not None:
            if meter is joined[1]:
                self._joined[record.request_id] = (record.upstream, meter)
                return meter
            del self._joined[record.request_id]
            self._carry(record.request_id, joined[1].finish_request(record.request_id))
        if meter is None:
            return None
        self._join(record, meter)
        return meter if record.request_id in self._joined else None

    def _carry(self, request_id: int, energy_j: float | None) -> None:
        earlier = self._carried_j.get(request_id, 0.0)
        self._carried_j[request_id] = None if earlier is None or energy_j is None else earlier + energy_j

    def _add_tokens(self, record: RequestRecord, tokens: int) -> None:
        meter = self._meter_of(record)
        if meter is not None:
            meter.add_tokens(record.request_id, tokens)

    def _finish_energy(self, record: RequestRecord) -> float | None:
        """The request's joules: from its replica's meter (None when that does not measure)."""
        joined = self._joined.pop(record.request_id, None)
        energy_j = None if joined is None else joined[1].finish_request(record.request_id)
        if record.request_id in self._carried_j:
            carried = self._carried_j.pop(record.request_id)
            energy_j = None if carried is None or energy_j is None else carried + energy_j
        return energy_j

    # --- a finished request -----------------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        """Account for a finished request: energy, ledger row (committed now), stats, metrics."""
        self.in_flight -= 1
        remote_cost_usd = None
        if record.routed_to == "local":
            record.energy_j = self._finish_energy(record)
            route_cost_usd = self._tariff.to_usd(self._tariff.energy_cost(record.energy_j))
        else:
            price = self._remote_price
            remote_cost_usd = (
                0.0 if price is None else api_cost_usd(price, record.prompt_tokens, record.completion_tokens)
            )
            route_cost_usd = remote_cost_usd
        api_cost = api_costs_usd(self._settings.api_prices, record.prompt_tokens, record.completion_tokens)
        self._write_ledger(record, api_cost, remote_cost_usd)
        self.book.add(
            FinishedRequest(
                finished_s=record.finished_s or time.monotonic(),
                ok=record.ok,
                prompt_tokens=record.prompt_tokens or 0,
                completion_tokens=record.completion_tokens or 0,
                ttft_ms=record.ttft_ms,
                tpot_ms=record.tpot_ms,
                e2e_ms=record.e2e_ms or 0.0,
                energy_j=record.energy_j,
                api_cost_usd=api_cost,
                upstream=record.upstream,
                routed_to=record.routed_to,
                route_reason=record.route_reason,
                remote_cost_usd=remote_cost_usd,
            )
        )
        self.metrics.observe(record, route_cost_usd)
        if self._on_finish is not None:
            self._on_finish(record)
        if self._settings.access_log:
            print(f"[request] {describe(record)}", file=sys.stderr, flush=True)

    def _write_ledger(
        self, record: RequestRecord, api_cost_usd: dict[str, float], remote_cost_usd: float | None
    ) -> None:
        row = RequestRow(
            finished_at=time.time(),
            route=record.route,
            upstream=record.upstream,
            model=record.model,
            stream=record.stream,
            status=record.status or 0,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            ttft_ms=record.ttft_ms,
            tpot_ms=record.tpot_ms,
            e2e_ms=record.e2e_ms or 0.0,
            energy_j=record.energy_j,
            electricity_cost=self._tariff.energy_cost(record.energy_j),
            currency=self._tariff.currency,
            api_cost_usd=api_cost_usd,
            key_name=record.key_name,
            routed_to=record.routed_to,
            route_reason=record.route_reason,
            remote_cost_usd=remote_cost_usd,
        )
        try:
            self._ledger.add_request(row)
        except Exception:
            self.ledger_errors += 1
            logger.exception("ledger: could not write the row of request %s", record.request_id)

    # --- energy over time -----------------------------------------------------------------

    async def keep_energy_history(self) -> None:
        """Note each meter's totals every second (for windows); write them to the ledger now and then."""
        next_row_s = time.monotonic() + self._settings.energy_ledger_interval_s
        while True:
            await asyncio.sleep(ENERGY_NOTE_PERIOD_S)
            now_s = time.monotonic()
            for entry in self.meters.meters:
                totals = EnergyTotals.of(entry.meter.snapshot())
                if totals is not None:
                    self.book.note_energy(now_s, totals, entry.key)
            if now_s >= next_row_s:
                self.write_energy_rows()
                next_row_s = now_s + self._settings.energy_ledger_interval_s

    def write_energy_rows(self) -> None:
        """Write each meter's energy since its previous row (or start) to the ledger, one row each.

        A meter that is unavailable now writes an "unavailable" row with the reason; its next
        measured row counts from its last measured totals, so nothing is counted twice.
        """
        ended_at = time.time()
        for entry in self.meters.meters:
            started_at, previous = self._energy_rows_since[entry.key]
            snapshot = entry.meter.snapshot()
            now = EnergyTotals.of(snapshot)
            used = None if now is None else now.minus(previous or EnergyTotals(0.0, 0.0, 0.0, 0.0))
            cost = self._tariff.energy_cost(None if used is None else used.total_j)
            row = EnergyRow(
                started_at=started_at,
                ended_at=ended_at,
                status=snapshot.status,
                source=snapshot.source,
                reason=snapshot.reason,
                total_j=None if used is None else used.total_j,
                idle_j=None if used is None else used.idle_j,
                attributed_j=None if used is None else used.active_j - used.unattributed_j,
                unattributed_j=None if used is None else used.unattributed_j,
                electricity_cost=cost,
                electricity_cost_usd=self._tariff.to_usd(cost),
                currency=self._tariff.currency,
                replica=None if entry.key == LOCAL_METER else entry.key,
            )
            try:
                self._ledger.add_energy(row)
            except Exception:
                self.ledger_errors += 1
                logger.exception("ledger: could not write an energy row")
            self._energy_rows_since[entry.key] = (ended_at, previous if now is None else now)

    # --- reporting ------------------------------------------------------------------------

    def stats(
        self, window_s: float | None, upstream: dict[str, Any], replicas: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The /stats document; `upstream`: vLLM's load, `replicas`: `Balancer.status()`."""
        snapshots = [(entry, entry.meter.snapshot()) for entry in self.meters.meters]
        inputs = StatsInputs(
            energy=combined_snapshot([(entry.label, snapshot) for entry, snapshot in snapshots]),
            tariff=self._tariff,
            api_prices=self._settings.api_prices,
            in_flight=self.in_flight,
            upstream=upstream,
            power_limit_w=self.meters.power_limit_w(),
            replicas=replicas or (),
            remote=self._remote_view(),
            meters=[MeterEnergy(entry.key, entry.urls, entry.exporter, snapshot) for entry, snapshot in snapshots],
        )
        return build_stats(self.book, inputs, window_s, time.monotonic())

    def _remote_view(self) -> dict[str, Any] | None:
        """The remote upstream as /stats shows it (never its key)."""
        settings, price = self._settings, self._remote_price
        if price is None:
            return None
        return {
            "url": settings.remote_url,
            "model": settings.remote_model,
            "price": {"input_usd_per_mtok": price.input_usd_per_mtok, "output_usd_per_mtok": price.output_usd_per_mtok},
        }

    def _live_figures(self) -> LiveFigures:
        snapshot = self.meters.snapshot()
        since_s = time.monotonic() - THROUGHPUT_WINDOW_S
        completion_tokens = sum(request.completion_tokens for request in self.book.recent(since_s))
        return LiveFigures(
            energy=snapshot,
            electricity_cost=self._tariff.energy_cost(snapshot.total_j),
            currency=self._tariff.currency,
            in_flight=self.in_flight,
            completion_tokens_per_s=completion_tokens / THROUGHPUT_WINDOW_S,
        )
