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

A reading with neither energy nor power (a failed scrape, a lost device) is a gap: the intervals
on both sides of it are counted as gaps and measure nothing (their energy is in no total, never
a 0 J that was not measured, nor an hour's energy given to whatever runs when readings resume).

Sources read over the network (`networked = True`: the DCGM exporter,
`server.telemetry.dcgm_source`) are read only from the sampler thread, never while finishing a
request on the event loop; a request that finishes before the exporter's next update leaves its
tokens as a weight of that interval whose share goes to `unattributed_j` (not to the requests
still running). Such a source may become unavailable and come back: the meter keeps sampling and
tracking requests throughout; a request whose energy is incomplete (it spanned a gap or ended
while the source was unavailable) gets None, and what it had been given moves to
`unattributed_j`. So does one that ran entirely between two updates of the exporter: no
measurement covers it alone.

Several replicas (`ReplicaMeters`): one meter per replica that has its own source (its host's
DCGM exporter), and the local meter (this host's NVML or RAPL) shared by those that have none;
each conserves energy on its own.

Device access lives in `server.telemetry.power_sources` and `server.telemetry.dcgm_source`; this
module only calls `source.read()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from server.telemetry.power_sources import PowerSource, Reading, SourceStatus

__all__ = [
    "LOCAL_METER",
    "THIS_HOST",
    "EnergyMeter",
    "EnergySnapshot",
    "IntervalEnergy",
    "ReplicaMeter",
    "ReplicaMeters",
    "combined_snapshot",
    "interval_energy_j",
]

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
    complete: bool = True  # False once it spanned a gap: its energy is not known in full
    intervals: int = 0  # measured intervals that closed while it ran


class EnergyMeter:
    """Attributes a power source's energy to requests by the tokens they process.

    `idle_w`: idle power in watts; None means measure it over the first `idle_window_s` seconds
    of intervals with no request in flight (time-weighted mean of ΔE/Δt). Until then, busy
    intervals use the estimate so far (0 W before any idle interval was seen).
    `sample_hz`: how often the sampler thread reads the source.
    `zero_energy_warn_intervals`: warn when the energy stays at 0 J this many intervals in a row
    while requests run.

    With an unavailable source the meter measures nothing: no thread, request methods return
    None at once, and the snapshot's totals are None (never a 0 J that was not measured). A
    networked source (see the module docstring) is sampled and tracked even while unavailable.
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
        self._networked = bool(getattr(source, "networked", False))
        self._idle_w = idle_w
        self._idle_window_s = idle_window_s
        self._period_s = 1.0 / sample_hz
        self._zero_warn_intervals = zero_energy_warn_intervals

        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # readings reach tick() in the order they were taken
        self._requests: dict[RequestId, _Request] = {}
        self._departed: list[_Request] = []  # finished inside the open interval (networked sources)
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
        self._gap_streak = 0
        self._zero_streak = 0

        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def measuring(self) -> bool:
        """The source reads now: the snapshot has totals."""
        return self._source.status == "ok"

    @property
    def tracking(self) -> bool:
        """Requests are followed and the source sampled: while measuring, and always for a
        networked source (it may come back)."""
        return self._networked or self._source.status == "ok"

    @property
    def source(self) -> PowerSource:
        return self._source

    # --- requests -------------------------------------------------------------------------

    def start_request(self, request_id: RequestId, reports_tokens: bool = True) -> None:
        """Begin attributing energy to `request_id`.

        `reports_tokens=False`: the request's tokens are unknown until it ends; it gets an
        estimated share of every interval it is in flight (see the module docstring).
        """
        if not self.tracking:
            return None
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} already started")
            self._requests[request_id] = _Request(reports_tokens)
        return None

    def add_tokens(self, request_id: RequestId, tokens: int) -> None:
        """Report tokens the request processed just now (prompt at prefill, output as it streams)."""
        if not self.tracking:
            return None
        if tokens < 0:
            raise ValueError(f"token count must be >= 0, got {tokens}")
        with self._lock:
            self._request(request_id).pending_tokens += tokens
        return None

    def finish_request(self, request_id: RequestId) -> float | None:
        """Stop attributing to `request_id`; returns its joules (None when not measuring, or when
        its energy is not known in full: it spanned a gap, or, with a networked source, no update
        of the source fell while it ran).

        While the sampler runs, the open interval is closed first (one extra reading), so a
        request shorter than the sampling period still gets its share of the energy it used.
        Without the sampler (replayed traces), tokens reported since the last interval closed
        get no energy: later intervals are not given to a finished request. A networked source is
        not read here (that would block the caller on HTTP); see the module docstring.
        """
        if not self.tracking:
            return None
        if self.sampling and not self._networked:
            self._read_and_tick()
        with self._lock:
            request = self._request(request_id)
            del self._requests[request_id]
            if self._networked and (request.pending_tokens > 0 or not request.reports_tokens):
                self._departed.append(request)  # still weighs the open interval; its share goes unattributed
            if self.measuring and request.complete and (request.intervals or not self._networked):
                return request.energy_j
            self._attributed_j -= request.energy_j  # given to a request that cannot report it
            self._unattributed_j += request.energy_j
            return None

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
        if not self.tracking:
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
            if not interval.measured:  # a gap: nothing to split, nor to learn idle power from
                self._last_power_w = None
                for request in self._requests.values():
                    request.pending_tokens = 0
                    request.complete = False
                self._departed.clear()
                return
            energy_j = interval.energy_j
            self._total_j += energy_j
            self._last_power_w = reading.power_w if reading.power_w is not None else energy_j / elapsed_s

            if self._idle_w is None and not self._requests and not self._departed:
                self._measure_idle(energy_j, elapsed_s)
                return
            idle_w = self._idle_w if self._idle_w is not None else self._idle_estimate_w() or 0.0
            idle_j = min(energy_j, idle_w * elapsed_s)
            self._idle_j += idle_j
            self._attribute(energy_j - idle_j)

    def _attribute(self, active_j: float) -> None:
        """Split active energy by each request's weight this interval; clear the pending tokens.

        Requests that finished inside the interval (`_departed`, networked sources only) weigh
        in too, but their share is unattributed: it reached them too late to report.
        """
        running = list(self._requests.values())
        weights = self._weights([*running, *self._departed])
        total_weight = sum(weights)
        if active_j > 0 and total_weight > 0:
            for request, weight in zip(running, weights, strict=False):
                request.energy_j += active_j * weight / total_weight
            late_j = active_j * sum(weights[len(running) :]) / total_weight if self._departed else 0.0
            self._attributed_j += active_j - late_j
            self._unattributed_j += late_j
        else:
            self._unattributed_j += active_j
        for request in running:
            request.pending_tokens = 0
            request.intervals += 1
        self._departed.clear()

    @staticmethod
    def _weights(requests: Sequence[_Request]) -> list[float]:
        """Reported tokens; a request that cannot report counts as the mean reporter (or 1)."""
        reported = [r.pending_tokens for r in requests if r.reports_tokens and r.pending_tokens > 0]
        silent_weight = sum(reported) / len(reported) if reported else 1.0
        return [float(r.pending_tokens) if r.reports_tokens else silent_weight for r in requests]

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
            self._gap_streak += 1
            if self._gap_streak == 1:
                logger.warning(
                    "energy: %s gave a reading with neither energy nor power (%s); intervals without readings "
                    "are not counted",
                    self._source.name,
                    self._source.reason,
                )
        elif self._gap_streak:
            logger.info(
                "energy: %s readings resumed after %d interval(s) not counted", self._source.name, self._gap_streak
            )
            self._gap_streak = 0
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
                return EnergySnapshot(status, reason, name, None, None, None, None, None, None, None, False, 0, 0, 0, 0)
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
        """Start the sampler thread; returns False (and starts nothing) when not tracking."""
        if not self.tracking:
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
            if not self.tracking:
                logger.warning("energy: measuring stopped (%s)", self._source.reason)
                return
            if self._stop_event.wait(self._period_s):
                return


# --- several replicas ---------------------------------------------------------------------

LOCAL_METER = "local"  # the key of the meter that reads this host's own devices (NVML, RAPL)
THIS_HOST = "this host"  # how people read that key


@dataclass(frozen=True, slots=True)
class ReplicaMeter:
    """A meter and the replicas whose requests it measures.

    `key`: LOCAL_METER for this host's own devices, shared by every replica without a source of
    its own; else the replica's base URL. `exporter`: where that replica's source reads (its DCGM
    exporter's URL); None for the local meter.
    """

    key: str
    meter: EnergyMeter
    urls: tuple[str, ...]
    exporter: str | None = None

    @property
    def label(self) -> str:
        return THIS_HOST if self.key == LOCAL_METER else self.key


class ReplicaMeters:
    """The gateway's energy meters: which one measures the requests a replica serves."""

    def __init__(self, meters: Sequence[ReplicaMeter]):
        if not meters:
            raise ValueError("at least one energy meter is needed")
        keys = [entry.key for entry in meters]
        if len(set(keys)) != len(keys):
            raise ValueError(f"energy meters with the same key: {keys}")
        self.meters = tuple(meters)
        self._by_url = {url: entry.meter for entry in meters for url in entry.urls}

    @classmethod
    def single(cls, meter: EnergyMeter, urls: Sequence[str] = ()) -> ReplicaMeters:
        """One local meter for every replica (no replica has a source of its own)."""
        return cls([ReplicaMeter(LOCAL_METER, meter, tuple(urls))])

    @property
    def only(self) -> EnergyMeter | None:
        """The meter when there is just one: every request is its, whichever replica serves it."""
        return self.meters[0].meter if len(self.meters) == 1 else None

    def for_upstream(self, url: str) -> EnergyMeter | None:
        """The meter of the replica at `url` (None for one no meter measures, e.g. "gateway")."""
        only = self.only
        return only if only is not None else self._by_url.get(url)

    @property
    def tracking(self) -> bool:
        return any(entry.meter.tracking for entry in self.meters)

    def stop(self) -> None:
        for entry in self.meters:
            entry.meter.stop()

    def snapshot(self) -> EnergySnapshot:
        """All meters as one (`combined_snapshot`): what /metrics and the top of /stats show."""
        return combined_snapshot([(entry.label, entry.meter.snapshot()) for entry in self.meters])

    def power_limit_w(self) -> float | None:
        """The enforced power caps summed over the meters that can read one (NVML), in W."""
        limits = [limit for entry in self.meters if (limit := entry.meter.power_limit_w()) is not None]
        return sum(limits) if limits else None


def _sum_or_none(values: Sequence[float | None]) -> float | None:
    return None if None in values else sum(value for value in values if value is not None)


def combined_snapshot(parts: Sequence[tuple[str, EnergySnapshot]]) -> EnergySnapshot:
    """Several meters' snapshots (each with a label: a replica URL, or "this host") as one.

    One part is returned as it is. Otherwise the totals, power and idle power (W) are the sums over
    the meters that measure; the status is "ok" when at least one measures, and the reason names
    each that does not, and why. Totals are None only when none measures.
    """
    if len(parts) == 1:
        return parts[0][1]
    measured = [snapshot for _, snapshot in parts if snapshot.status == "ok" and snapshot.total_j is not None]
    missing = [(label, snapshot) for label, snapshot in parts if snapshot.status != "ok" or snapshot.total_j is None]
    source = "+".join(dict.fromkeys(snapshot.source for _, snapshot in parts))
    in_flight = sum(snapshot.requests_in_flight for snapshot in measured)
    if not measured:
        reason = "; ".join(f"{label}: {snapshot.reason}" for label, snapshot in parts)
        return EnergySnapshot(
            "unavailable", reason, source, None, None, None, None, None, None, None, False, 0, 0, 0, 0
        )
    if missing:
        reason = f"measured on {len(measured)} of {len(parts)} meters; not measured: " + "; ".join(
            f"{label}: {snapshot.reason}" for label, snapshot in missing
        )
    else:
        reason = "; ".join(f"{label}: {snapshot.reason}" for label, snapshot in parts)
    return EnergySnapshot(
        status="ok",
        reason=reason,
        source=source,
        total_j=sum(snapshot.total_j or 0.0 for snapshot in measured),
        active_j=sum(snapshot.active_j or 0.0 for snapshot in measured),
        attributed_j=sum(snapshot.attributed_j or 0.0 for snapshot in measured),
        idle_j=sum(snapshot.idle_j or 0.0 for snapshot in measured),
        unattributed_j=sum(snapshot.unattributed_j or 0.0 for snapshot in measured),
        power_w=_sum_or_none([snapshot.power_w for snapshot in measured]),
        idle_w=_sum_or_none([snapshot.idle_w for snapshot in measured]),
        idle_measuring=any(snapshot.idle_measuring for snapshot in measured),
        requests_in_flight=in_flight,
        intervals=sum(snapshot.intervals for snapshot in measured),
        resets=sum(snapshot.resets for snapshot in measured),
        gaps=sum(snapshot.gaps for snapshot in measured),
    )
