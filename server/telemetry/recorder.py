"""Where every request's measurements go: the energy meter, /stats, /metrics, the ledger, the log.

Requests routed to the remote upstream (server/control/hybrid_routing.py) use no local energy: the meter never
sees them, and their cost is their tokens × the remote's price.

The proxy calls `begin` when a request is sent upstream, `token_sink` to report tokens as a
stream goes, and `finish` once, before the client receives the answer's last bytes: so a
request's ledger row is committed before its client can see it finished.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from server.accounting.tariff import api_cost_usd, api_costs_usd
from server.telemetry.energy_attribution import EnergyMeter
from server.accounting.ledger import EnergyRow, Ledger, RequestRow
from server.telemetry.metrics import GatewayMetrics, LiveFigures
from server.runtime.settings import Settings
from server.telemetry.stats import EnergyTotals, FinishedRequest, StatsBook, StatsInputs, build_stats
from server.telemetry.request_record import RequestRecord, TokenSink, describe

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0
ENERGY_NOTE_PERIOD_S = 1.0


class RequestRecorder:
    """The gateway's accounting. Runs on the event loop (the meter's own thread aside).

    `on_finish` (if given) is called with every finished record after it is accounted, before
    its client sees the end: e.g. to charge the key's tokens/minute limit.
    """

    def __init__(
        self,
        settings: Settings,
        meter: EnergyMeter,
        ledger: Ledger,
        on_finish: Callable[[RequestRecord], None] | None = None,
    ):
        self._settings = settings
        self._on_finish = on_finish
        self._tariff = settings.tariff
        self._remote_price = settings.remote_api_price
        self._meter = meter
        self._ledger = ledger
        self.book = StatsBook(settings.stats_retention)
        self.metrics = GatewayMetrics(self._live_figures)
        self.in_flight = 0
        self.ledger_errors = 0
        self._energy_row_since: tuple[float, EnergyTotals | None] = (time.time(), self._energy_totals())

    def begin(self, record: RequestRecord) -> None:
        """A request goes upstream. Streams report tokens as they go; whole answers cannot."""
        self.in_flight += 1
        if record.routed_to == "local":
            self._meter.start_request(record.request_id, reports_tokens=record.stream)

    def token_sink(self, record: RequestRecord) -> TokenSink | None:
        """Where a stream reports its tokens for energy attribution (None when not measuring)."""
        if not self._meter.measuring or record.routed_to != "local":
            return None
        return lambda tokens: self._meter.add_tokens(record.request_id, tokens)

    def finish(self, record: RequestRecord) -> None:
        """Account for a finished request: energy, ledger row (committed now), stats, metrics."""
        self.in_flight -= 1
        remote_cost_usd = None
        if record.routed_to == "local":
            record.energy_j = self._meter.finish_request(record.request_id)
            route_cost_usd = self._tariff.to_usd(self._tariff.energy_cost(record.energy_j))
        else:
            price = self._remote_price
            remote_cost_usd = 0.0 if price is None else api_cost_usd(price, record.prompt_tokens, record.completion_tokens)
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
        """Note the meter's totals every second (for windows); write them to the ledger now and then."""
        next_row_s = time.monotonic() + self._settings.energy_ledger_interval_s
        while True:
            await asyncio.sleep(ENERGY_NOTE_PERIOD_S)
            now_s = time.monotonic()
            totals = self._energy_totals()
            if totals is not None:
                self.book.note_energy(now_s, totals)
            if now_s >= next_row_s:
                self.write_energy_row()
                next_row_s = now_s + self._settings.energy_ledger_interval_s

    def write_energy_row(self) -> None:
        """Write the energy used since the previous energy row (or start) to the ledger."""
        started_at, previous = self._energy_row_since
        snapshot = self._meter.snapshot()
        now, ended_at = EnergyTotals.of(snapshot), time.time()
        used = None if now is None else now.minus(previous or EnergyTotals(0.0, 0.0, 0.0, 0.0))
        attributed_j = None if used is None else used.active_j - used.unattributed_j
        cost = self._tariff.energy_cost(None if used is None else used.total_j)
        row = EnergyRow(
            started_at=started_at,
            ended_at=ended_at,
            status=snapshot.status,
            source=snapshot.source,
            reason=snapshot.reason,
            total_j=None if used is None else used.total_j,
            idle_j=None if used is None else used.idle_j,
            attributed_j=attributed_j,
            unattributed_j=None if used is None else used.unattributed_j,
            electricity_cost=cost,
            electricity_cost_usd=self._tariff.to_usd(cost),
            currency=self._tariff.currency,
        )
        try:
            self._ledger.add_energy(row)
        except Exception:
            self.ledger_errors += 1
            logger.exception("ledger: could not write an energy row")
        self._energy_row_since = (ended_at, now)

    def _energy_totals(self) -> EnergyTotals | None:
        return EnergyTotals.of(self._meter.snapshot())

    # --- reporting ------------------------------------------------------------------------

    def stats(
        self, window_s: float | None, upstream: dict[str, Any], replicas: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The /stats document; `upstream`: vLLM's load, `replicas`: `Balancer.status()`."""
        inputs = StatsInputs(
            energy=self._meter.snapshot(),
            tariff=self._tariff,
            api_prices=self._settings.api_prices,
            in_flight=self.in_flight,
            upstream=upstream,
            power_limit_w=self._meter.power_limit_w(),
            replicas=replicas or (),
            remote=self._remote_view(),
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
        snapshot = self._meter.snapshot()
        since_s = time.monotonic() - THROUGHPUT_WINDOW_S
        completion_tokens = sum(request.completion_tokens for request in self.book.recent(since_s))
        return LiveFigures(
            energy=snapshot,
            electricity_cost=self._tariff.energy_cost(snapshot.total_j),
            currency=self._tariff.currency,
            in_flight=self.in_flight,
            completion_tokens_per_s=completion_tokens / THROUGHPUT_WINDOW_S,
        )
