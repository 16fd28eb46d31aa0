"""Measurement windows and attribution: turn a power source's readings into joules per request.

A sampler thread reads the source (10 Hz by default) and hands each reading to `tick()`, which is
plain arithmetic on the interval since the previous reading:

* energy of the interval: the counter's increase, or, where there is no counter, the trapezoid
  of instant power ((p0 + p1) / 2 × Δt);
* idle energy: min(ΔE, idle_w × Δt), the fixed cost of keeping the box on;
* active energy: the rest, split among the requests in flight in proportion to the tokens each
  reported during the interval (`add_tokens`); when nothing in flight has a share it is
  `unattributed_j`.

Requests that cannot report tokens as they go (non-streaming answers: vLLM gives their `usage`
only at the end) are started with `reports_tokens=False`. Each interval counts them as doing
as much as the average reporting request did in it, or, when none reported, splits the energy
equally among them: an estimate, the best the gateway can see.

So, always: sum of per-request energy + idle_j + unattributed_j == total_j (up to rounding).

Device access lives in `server.telemetry.power_sources`; this module only calls `source.read()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass

from server.telemetry.power_sources import PowerSource, Reading, SourceStatus

__all__ = ["EnergyMeter", "EnergySnapshot", "IntervalEnergy", "interval_energy_j"]

logger = logging.getLogger(__name__)

RequestId = Hashable


@dataclass(frozen=True, slots=True)
class IntervalEnergy:
    """Energy between two readings, in joules, and how it was obtained.

    `counter_reset`: the cumulative counter went down (driver reload, GPU reset); the new value
    is a fresh baseline and the interval's energy is estimated from instant power when both
    readings have it, else 0 J (under-counting one interval beats inventing one).
    `measured`: False when neither a counter nor power covered the interval (a gap: 0 J).
    """

    energy_j: float
    counter_reset: bool = False
    measured: bool = True


def _trapezoid_j(previous: Reading, current: Reading) -> float | None:
    """(p0 + p1) / 2 × Δt in joules, or None when either reading lacks power."""
    if previous.power_w is None or current.power_w is None:
        return None
    return (previous.power_w + current.power_w) / 2.0 * (current.time_s - previous.time_s)


def interval_energy_j(previous: Reading, current: Reading) -> IntervalEnergy:
    """The energy consumed between two readings of one source (see `IntervalEnergy`)."""
    if previous.energy_j is not None and current.energy_j is not None:
        if current.energy_j >= previous.energy_j:
            return IntervalEnergy(current.energy_j - previous.energy_j)
        estimate_j = _trapezoid_j(previous, current)
        return IntervalEnergy(0.0 if estimate_j is None else estimate_j, counter_reset=True)
    estimate_j = _trapezoid_j(previous, current)
    if estimate_j is None:
        return IntervalEnergy(0.0, measured=False)
    return IntervalEnergy(estimate_j)


@dataclass(frozen=True, slots=True)
class EnergySnapshot:
    """The meter's totals now. Every energy and power is None when the source is unavailable.

    `idle_w` is the configured idle power, or the measured one (`idle_measuring` is True while
    the start-up window is still open; the value is then the estimate so far, or None).
    `intervals`: readings turned into energy; `resets`: counter decreases; `gaps`: intervals
    with no usable data (their energy is missing from every total).
    """

    status: SourceStatus
    reason: str
    source: str
    total_j: float | None
    active_j: float | None
    attributed_j: float | None
    idle_j: float | None
    unattributed_j: float | None
    power_w: float | None
    idle_w: float | None
    idle_measuring: bool
    requests_in_flight: int
    intervals: int
    resets: int
    gaps: int


@dataclass(slots=True)
class _Request:
    reports_tokens: bool = True
    energy_j: float = 0.0
    pending_tokens: int = 0


class EnergyMeter:
    """Attributes a power source's energy to requests by the tokens they process.

    `idle_w`: idle power in watts; None means measure it over the first `idle_window_s` seconds
    of intervals with no request in flight (time-weighted mean of ΔE/Δt). Until then, busy
    intervals use the estimate so far (0 W before any idle interval was seen).
    `sample_hz`: how often the sampler thread reads the source.
    `zero_energy_warn_intervals`: warn when the energy stays at 0 J this many intervals in a row
    while requests run.

    With an unavailable source the meter measures nothing: no thread, request methods return
    None at once, and the snapshot's totals are None (never a 0 J that was not measured).
    """

    def __init__(
        self,
        source: PowerSource,
        *,
        idle_w: float | None = None,
        idle_window_s: float = 5.0,
        sample_hz: float = 10.0,
        zero_energy_warn_intervals: int = 50,
    ):
        if idle_w is not None and idle_w < 0:
            raise ValueError(f"idle power must be >= 0 W, got {idle_w}")
        if idle_window_s <= 0 or sample_hz <= 0 or zero_energy_warn_intervals < 1:
            raise ValueError("idle_window_s and sample_hz must be > 0, zero_energy_warn_intervals >= 1")
        self._source = source
        self._idle_w = idle_w
        self._idle_window_s = idle_window_s
        self._period_s = 1.0 / sample_hz
        self._zero_warn_intervals = zero_energy_warn_intervals

        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # readings reach tick() in the order they were taken
        self._requests: dict[RequestId, _Request] = {}
        self._last: Reading | None = None
        self._last_power_w: float | None = None
        self._total_j = 0.0
        self._idle_j = 0.0
        self._attributed_j = 0.0
        self._unattributed_j = 0.0
        self._idle_sample_j = 0.0
        self._idle_sample_s = 0.0
        self._intervals = 0
        self._resets = 0
        self._gaps = 0
        self._zero_streak = 0

        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def measuring(self) -> bool:
        return self._source.status == "ok"

    # --- requests -------------------------------------------------------------------------

    def start_request(self, request_id: RequestId, reports_tokens: bool = True) -> None:
        """Begin attributing energy to `request_id`.

        `reports_tokens=False`: the request's tokens are unknown until it ends; it gets an
        estimated share of every interval it is in flight (see the module docstring).
        """
        if not self.measuring:
            return None
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} already started")
            self._requests[request_id] = _Request(reports_tokens)
        return None

    def add_tokens(self, request_id: RequestId, tokens: int) -> None:
        """Report tokens the request processed just now (prompt at prefill, output as it streams)."""
        if not self.measuring:
            return None
        if tokens < 0:
            raise ValueError(f"token count must be >= 0, got {tokens}")
        with self._lock:
            self._request(request_id).pending_tokens += tokens
        return None

    def finish_request(self, request_id: RequestId) -> float | None:
        """Stop attributing to `request_id`; returns its joules (None when not measuring).

        While the sampler runs, the open interval is closed first (one extra reading), so a
        request shorter than the sampling period still gets its share of the energy it used.
        Without the sampler (replayed traces), tokens reported since the last interval closed
        get no energy: later intervals are not given to a finished request.
        """
        if not self.measuring:
            return None
        if self.sampling:
            self._read_and_tick()
        with self._lock:
            request = self._request(request_id)
            del self._requests[request_id]
            return request.energy_j

    def _request(self, request_id: RequestId) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} was not started (or already finished)") from None

    # --- arithmetic -----------------------------------------------------------------------

    def tick(self, reading: Reading) -> None:
        """Account for the interval between the previous reading and `reading`.

        The first reading is only a baseline; a reading not later than the previous one is
        ignored. Pending tokens are used up by each interval, whatever happens to its energy.
        """
        if not self.measuring:
            return
        with self._lock:
            previous = self._last
            if previous is not None and reading.time_s <= previous.time_s:
                return
            self._last = reading
            if previous is None:
                self._last_power_w = reading.power_w
                return
            elapsed_s = reading.time_s - previous.time_s
            interval = interval_energy_j(previous, reading)
            self._intervals += 1
            self._note_anomalies(interval)
            energy_j = interval.energy_j
            self._total_j += energy_j
            self._last_power_w = reading.power_w if reading.power_w is not None else energy_j / elapsed_s

            if self._idle_w is None and not self._requests:
                self._measure_idle(energy_j, elapsed_s)
                return
            idle_w = self._idle_w if self._idle_w is not None else self._idle_estimate_w() or 0.0
            idle_j = min(energy_j, idle_w * elapsed_s)
            self._idle_j += idle_j
            self._attribute(energy_j - idle_j)

    def _attribute(self, active_j: float) -> None:
        """Split active energy by each request's weight this interval; clear the pending tokens."""
        weights = self._weights()
        total_weight = sum(weights)
        if active_j > 0 and total_weight > 0:
            for request, weight in zip(self._requests.values(), weights, strict=True):
                request.energy_j += active_j * weight / total_weight
            self._attributed_j += active_j
        else:
            self._unattributed_j += active_j
        for request in self._requests.values():
            request.pending_tokens = 0

    def _weights(self) -> list[float]:
        """Reported tokens; a request that cannot report counts as the mean reporter (or 1)."""
        reported = [r.pending_tokens for r in self._requests.values() if r.reports_tokens and r.pending_tokens > 0]
        silent_weight = sum(reported) / len(reported) if reported else 1.0
        return [
            float(r.pending_tokens) if r.reports_tokens else silent_weight for r in self._requests.values()
        ]

    def _measure_idle(self, energy_j: float, elapsed_s: float) -> None:
        """An interval inside the idle window with nothing running: all of it is idle energy."""
        self._idle_j += energy_j
        self._idle_sample_j += energy_j
        self._idle_sample_s += elapsed_s
        if self._idle_sample_s >= self._idle_window_s:
            self._idle_w = self._idle_sample_j / self._idle_sample_s
            logger.info("energy: idle baseline %.1f W measured over %.1f s", self._idle_w, self._idle_sample_s)

    def _idle_estimate_w(self) -> float | None:
        return self._idle_sample_j / self._idle_sample_s if self._idle_sample_s > 0 else None

    def _note_anomalies(self, interval: IntervalEnergy) -> None:
        """Count resets and gaps; warn on them and on a long run of 0 J while requests run."""
        if interval.counter_reset:
            self._resets += 1
            logger.warning(
                "energy: the %s counter went down (driver reload or device reset?); taking it as a new "
                "baseline, interval estimated at %.3f J",
                self._source.name,
                interval.energy_j,
            )
        if not interval.measured:
            self._gaps += 1
            logger.warning("energy: a reading had neither energy nor power; that interval is not counted")
        if self._requests and interval.measured and interval.energy_j == 0:
            self._zero_streak += 1
            if self._zero_streak == self._zero_warn_intervals:
                logger.warning(
                    "energy: %d intervals in a row measured 0 J while %d request(s) ran; the %s counter may "
                    "update less often than %.3g Hz (lower sample_hz), or the measured device is not the one "
                    "serving (check CUDA_VISIBLE_DEVICES)",
                    self._zero_streak,
                    len(self._requests),
                    self._source.name,
                    1.0 / self._period_s,
                )
        else:
            self._zero_streak = 0

    # --- reporting ------------------------------------------------------------------------

    def power_limit_w(self) -> float | None:
        """The measured devices' enforced power cap in W, where the source can tell (NVML)."""
        read = getattr(self._source, "power_limit_w", None)
        return read() if callable(read) and self.measuring else None

    def snapshot(self) -> EnergySnapshot:
        status, reason, name = self._source.status, self._source.reason, self._source.name
        with self._lock:
            if status != "ok":
                return EnergySnapshot(
                    status, reason, name, None, None, None, None, None, None, None, False, 0, 0, 0, 0
                )
            return EnergySnapshot(
                status=status,
                reason=reason,
                source=name,
                total_j=self._total_j,
                active_j=self._attributed_j + self._unattributed_j,
                attributed_j=self._attributed_j,
                idle_j=self._idle_j,
                unattributed_j=self._unattributed_j,
                power_w=self._last_power_w,
                idle_w=self._idle_w if self._idle_w is not None else self._idle_estimate_w(),
                idle_measuring=self._idle_w is None,
                requests_in_flight=len(self._requests),
                intervals=self._intervals,
                resets=self._resets,
                gaps=self._gaps,
            )

    # --- sampler thread -------------------------------------------------------------------

    def start(self) -> bool:
        """Start the sampler thread; returns False (and starts nothing) when not measuring."""
        if not self.measuring:
            return False
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("energy sampler already running")
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._sample, name="energy-sampler", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the sampler thread and wait for it (up to `timeout_s`)."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def sampling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _read_and_tick(self) -> None:
        """One reading, accounted at once (the sampler and finishing requests both do this)."""
        with self._read_lock:
            self.tick(self._source.read())

    def _sample(self) -> None:
        while True:
            try:
                self._read_and_tick()
            except Exception:
                logger.exception("energy: sampler failed; measuring stopped")
                return
            if not self.measuring:
                logger.warning("energy: measuring stopped (%s)", self._source.reason)
                return
            if self._stop_event.wait(self._period_s):
                return
