"""Energy arithmetic on replayed traces: deltas, resets, trapezoids, idle, attribution, conservation."""

from __future__ import annotations

import logging
import random
import time

import pytest

import server.telemetry.energy_attribution
from server.telemetry.energy_attribution import (
    LOCAL_METER,
    EnergyMeter,
    EnergySnapshot,
    IntervalEnergy,
    ReplicaMeter,
    ReplicaMeters,
    combined_snapshot,
    interval_energy_j,
)
from server.telemetry.power_sources import Reading, SourceStatus, TraceSource, UnavailableSource


def replay(meter: EnergyMeter, trace: TraceSource, readings: int) -> None:
    """Feed `readings` readings of the trace to the meter, as the sampler would."""
    for _ in range(readings):
        meter.tick(trace.read())


def test_public_surface_is_exactly_all() -> None:
    assert set(server.telemetry.energy_attribution.__all__) == {
        "LOCAL_METER", "THIS_HOST", "EnergyMeter", "EnergySnapshot", "IntervalEnergy", "ReplicaMeter", "ReplicaMeters",
        "combined_snapshot", "interval_energy_j",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (Reading(0, 100.0, 50.0), Reading(2, 180.0, 70.0), IntervalEnergy(80.0)),  # counter wins over power
        (Reading(0, 100.0, 50.0), Reading(2, 3.0, 70.0), IntervalEnergy(120.0, counter_reset=True)),
        (Reading(0, 100.0, None), Reading(2, 3.0, None), IntervalEnergy(0.0, counter_reset=True)),
        (Reading(0, None, 50.0), Reading(2, None, 70.0), IntervalEnergy(120.0)),
        (Reading(0, 100.0, 50.0), Reading(2, None, 70.0), IntervalEnergy(120.0)),  # counter lost: power
        (Reading(0, None, None), Reading(2, None, 70.0), IntervalEnergy(0.0, measured=False)),
    ],
)
def test_interval_energy(previous: Reading, current: Reading, expected: IntervalEnergy) -> None:
    assert interval_energy_j(previous, current) == expected


def test_counter_deltas_split_into_idle_and_unattributed_when_nothing_runs() -> None:
    trace = TraceSource([(0, 1000.0, None), (1, 1080.0, None), (2, 1130.0, None), (3, 1140.0, None)])
    meter = EnergyMeter(trace, idle_w=50.0)
    replay(meter, trace, 4)
    snap = meter.snapshot()
    assert (snap.status, snap.source, snap.intervals) == ("ok", "trace", 3)
    assert snap.total_j == pytest.approx(140.0)  # 80 + 50 + 10
    assert snap.idle_j == pytest.approx(110.0)  # 50 + 50 + min(10, 50)
    assert snap.unattributed_j == pytest.approx(30.0)
    assert snap.active_j == pytest.approx(30.0)
    assert snap.attributed_j == 0.0
    assert snap.power_w == pytest.approx(10.0)  # no instant power: last interval's mean
    assert (snap.idle_w, snap.idle_measuring) == (50.0, False)


def test_counter_reset_is_a_new_baseline_estimated_from_power(caplog: pytest.LogCaptureFixture) -> None:
    trace = TraceSource([(0, 1000.0, 200.0), (1, 1200.0, 200.0), (2, 5.0, 100.0), (3, 105.0, 100.0)])
    meter = EnergyMeter(trace, idle_w=0.0)
    with caplog.at_level(logging.WARNING, logger="server.telemetry.energy_attribution"):
        replay(meter, trace, 4)
    snap = meter.snapshot()
    assert snap.total_j == pytest.approx(450.0)  # 200 + (200 + 100) / 2 × 1 + 100, never -1195
    assert (snap.resets, snap.gaps) == (1, 0)
    assert snap.power_w == 100.0
    assert any("counter went down" in record.message for record in caplog.records)


def test_without_a_counter_power_is_integrated_with_trapezoids() -> None:
    trace = TraceSource([(0.0, None, 100.0), (0.5, None, 200.0), (1.5, None, 300.0), (1.5, None, 999.0)])
    meter = EnergyMeter(trace, idle_w=0.0)
    replay(meter, trace, 4)  # the last reading has no elapsed time: ignored
    snap = meter.snapshot()
    assert snap.total_j == pytest.approx(325.0)  # 150 × 0.5 + 250 × 1
    assert snap.intervals == 2
    assert snap.power_w == 300.0


def test_a_reading_with_neither_counter_nor_power_is_a_counted_gap() -> None:
    trace = TraceSource([(0, None, 100.0), (1, None, None), (2, None, 100.0), (3, None, 100.0)])
    meter = EnergyMeter(trace, idle_w=0.0)
    replay(meter, trace, 4)
    snap = meter.snapshot()
    assert (snap.total_j, snap.gaps, snap.intervals) == (pytest.approx(100.0), 2, 3)


def test_idle_baseline_is_measured_over_the_start_up_window() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 40.0, None), (2.5, 100.0, None), (3.5, 200.0, None)])
    meter = EnergyMeter(trace, idle_window_s=2.0)
    replay(meter, trace, 2)
    snap = meter.snapshot()
    assert (snap.idle_w, snap.idle_measuring, snap.idle_j) == (pytest.approx(40.0), True, pytest.approx(40.0))

    meter.tick(trace.read())  # 60 J over 1.5 s: the window (2 s) is full, 100 J / 2.5 s
    snap = meter.snapshot()
    assert (snap.idle_w, snap.idle_measuring) == (pytest.approx(40.0), False)

    meter.start_request("a")
    meter.add_tokens("a", 7)
    meter.tick(trace.read())  # 100 J over 1 s: 40 J idle, 60 J to "a"
    assert meter.finish_request("a") == pytest.approx(60.0)
    snap = meter.snapshot()
    assert (snap.idle_j, snap.attributed_j, snap.total_j) == (pytest.approx(140.0), pytest.approx(60.0), 200.0)


def test_busy_intervals_inside_the_idle_window_use_the_estimate_so_far() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 30.0, None), (2, 130.0, None), (3, 150.0, None)])
    meter = EnergyMeter(trace, idle_window_s=10.0)
    replay(meter, trace, 2)  # 30 W idle so far
    meter.start_request("a")
    meter.add_tokens("a", 5)
    meter.tick(trace.read())  # 100 J: 30 J idle (estimate), 70 J to "a"; not part of the idle sample
    assert meter.finish_request("a") == pytest.approx(70.0)
    meter.tick(trace.read())  # idle again: 20 J
    snap = meter.snapshot()
    assert snap.idle_w == pytest.approx(25.0)  # (30 + 20) J / 2 s
    assert snap.idle_measuring
    assert snap.idle_j == pytest.approx(80.0)


def test_active_energy_is_split_by_tokens_among_three_requests() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 110.0, None), (2, 180.0, None), (3, 230.0, None), (4, 300.0, None)])
    meter = EnergyMeter(trace, idle_w=10.0)
    meter.tick(trace.read())
    for request_id, prompt_tokens in (("a", 10), ("b", 30), ("c", 60)):
        meter.start_request(request_id)
        meter.add_tokens(request_id, prompt_tokens)
    meter.tick(trace.read())  # 100 J active: a 10, b 30, c 60
    meter.add_tokens("a", 5)
    meter.add_tokens("c", 2)
    meter.add_tokens("c", 3)
    meter.tick(trace.read())  # 60 J active: a 30, c 30
    assert meter.finish_request("a") == pytest.approx(40.0)
    meter.add_tokens("c", 3)
    meter.tick(trace.read())  # 40 J active, all to c: a has finished and b reported nothing
    assert meter.snapshot().requests_in_flight == 2
    assert meter.finish_request("b") == pytest.approx(30.0)
    meter.add_tokens("c", 1)
    assert meter.finish_request("c") == pytest.approx(130.0)  # its last token's interval never closed
    meter.tick(trace.read())  # 60 J active, nobody in flight
    snap = meter.snapshot()
    assert snap.attributed_j == pytest.approx(200.0)
    assert snap.unattributed_j == pytest.approx(60.0)
    assert snap.idle_j == pytest.approx(40.0)
    assert snap.total_j == pytest.approx(300.0)
    with pytest.raises(KeyError, match="'a' was not started"):
        meter.add_tokens("a", 1)


def test_requests_in_flight_without_tokens_leave_energy_unattributed() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 50.0, None), (2, 60.0, None), (3, 100.0, None)])
    meter = EnergyMeter(trace, idle_w=20.0)
    meter.tick(trace.read())
    meter.start_request(1)
    meter.start_request(2)
    meter.tick(trace.read())  # 30 J active, no tokens reported: unattributed
    meter.add_tokens(1, 4)
    meter.tick(trace.read())  # 10 J, all idle: the 4 tokens are used up with no energy
    meter.add_tokens(2, 1)
    meter.tick(trace.read())  # 20 J active, all to request 2
    assert (meter.finish_request(1), meter.finish_request(2)) == (0.0, pytest.approx(20.0))
    snap = meter.snapshot()
    assert (snap.unattributed_j, snap.idle_j) == (pytest.approx(30.0), pytest.approx(50.0))


def test_requests_that_cannot_report_tokens_count_as_the_average_reporter() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 90.0, None), (2, 150.0, None), (3, 180.0, None)])
    meter = EnergyMeter(trace, idle_w=0.0)
    meter.tick(trace.read())
    meter.start_request("stream-a")
    meter.start_request("stream-b")
    meter.start_request("whole", reports_tokens=False)
    meter.add_tokens("stream-a", 10)
    meter.add_tokens("stream-b", 20)
    meter.tick(trace.read())  # 90 J over weights 10, 20, 15 (the reporters' mean)
    meter.add_tokens("stream-a", 6)
    meter.tick(trace.read())  # 60 J: stream-a 6, the silent one 6, stream-b 0
    assert meter.finish_request("stream-a") == pytest.approx(20.0 + 30.0)
    assert meter.finish_request("stream-b") == pytest.approx(40.0)
    meter.start_request("whole-2", reports_tokens=False)
    meter.tick(trace.read())  # 30 J, no reporter: split equally between the two silent ones
    assert meter.finish_request("whole") == pytest.approx(30.0 + 30.0 + 15.0)
    assert meter.finish_request("whole-2") == pytest.approx(15.0)
    assert meter.snapshot().attributed_j == pytest.approx(180.0)


def test_misuse_raises() -> None:
    meter = EnergyMeter(TraceSource([(0, 0.0, None)]), idle_w=0.0)
    meter.start_request("x")
    with pytest.raises(ValueError):
        meter.start_request("x")
    with pytest.raises(ValueError):
        meter.add_tokens("x", -1)
    with pytest.raises(KeyError):
        meter.finish_request("y")
    with pytest.raises(ValueError):
        EnergyMeter(TraceSource([(0, 0.0, None)]), idle_w=-1.0)


def test_energy_is_conserved_over_a_long_random_trace() -> None:
    rng = random.Random(1234)
    samples: list[tuple[float, float | None, float | None]] = []
    time_s, counter_j, expected_total_j = 0.0, 5_000.0, 0.0
    for step in range(2_000):
        samples.append((time_s, counter_j, None))
        elapsed_s = rng.uniform(0.05, 0.15)
        time_s += elapsed_s
        if step % 500 == 499:
            counter_j = rng.uniform(0.0, 10.0)  # driver reload: no power, so 0 J for that interval
        else:
            joules = rng.choice([0.0, rng.uniform(0.0, 40.0) * elapsed_s, rng.uniform(60.0, 400.0) * elapsed_s])
            counter_j += joules
            expected_total_j += joules
    trace = TraceSource(samples)
    meter = EnergyMeter(trace, idle_window_s=3.0)

    returned_j = 0.0
    in_flight: list[int] = []
    next_id = 0
    for index, _ in enumerate(samples):
        meter.tick(trace.read())
        if index >= 40 and rng.random() < 0.2:  # a quiet start (about 4 s) fills the 3 s idle window
            meter.start_request(next_id, reports_tokens=rng.random() < 0.7)
            in_flight.append(next_id)
            next_id += 1
        for request_id in in_flight:
            if rng.random() < 0.6:
                meter.add_tokens(request_id, rng.randint(1, 50))
        if in_flight and rng.random() < 0.15:
            returned_j += meter.finish_request(in_flight.pop(rng.randrange(len(in_flight))))
    for request_id in in_flight:
        returned_j += meter.finish_request(request_id)

    snap = meter.snapshot()
    assert (snap.resets, snap.intervals, snap.idle_measuring) == (3, 1_999, False)
    assert next_id > 300 and snap.attributed_j > 0 and snap.unattributed_j > 0 and snap.idle_j > 0
    assert snap.total_j == pytest.approx(expected_total_j, rel=1e-12)
    assert returned_j == pytest.approx(snap.attributed_j, rel=1e-12)
    assert returned_j + snap.idle_j + snap.unattributed_j == pytest.approx(snap.total_j, rel=1e-12)


def test_unavailable_source_measures_nothing_and_says_why() -> None:
    meter = EnergyMeter(UnavailableSource("no NVIDIA driver and no RAPL"), idle_w=30.0)
    assert meter.start() is False
    assert not meter.sampling
    assert meter.start_request("a") is None
    assert meter.add_tokens("a", 5) is None
    assert meter.finish_request("a") is None
    meter.tick(Reading(1.0, 10.0, 10.0))
    snap = meter.snapshot()
    assert (snap.status, snap.reason, snap.source) == ("unavailable", "no NVIDIA driver and no RAPL", "unavailable")
    assert (snap.total_j, snap.active_j, snap.idle_j, snap.unattributed_j, snap.power_w, snap.idle_w) == (None,) * 6
    meter.stop()  # harmless without a thread


def test_long_zero_energy_run_while_requests_run_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    trace = TraceSource([(t, 100.0, None) for t in range(7)])
    meter = EnergyMeter(trace, idle_w=0.0, zero_energy_warn_intervals=3)
    meter.start_request("a")
    with caplog.at_level(logging.WARNING, logger="server.telemetry.energy_attribution"):
        replay(meter, trace, 7)
    warnings = [record.message for record in caplog.records if "measured 0 J" in record.message]
    assert len(warnings) == 1
    assert "3 intervals in a row" in warnings[0] and "lower sample_hz" in warnings[0]


def wait_for(condition, limit_s: float = 10.0) -> None:
    """Poll until `condition()`; the limit only guards against a hang, it is not what is tested."""
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_sampler_thread_reads_the_source_and_stops_cleanly() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 10.0, None), (2, 30.0, None), (3, 60.0, None), (4, 100.0, None)])
    meter = EnergyMeter(trace, idle_w=0.0, sample_hz=1000.0)
    assert meter.start() is True
    with pytest.raises(RuntimeError):
        meter.start()
    wait_for(lambda: trace.exhausted)
    meter.stop()
    assert not meter.sampling
    snap = meter.snapshot()
    assert (snap.total_j, snap.intervals) == (100.0, 4)


class _ClockSource:
    """A steady 50 W on the real monotonic clock, as a live counter would read."""

    name, status, reason = "clock", "ok", "steady"

    def __init__(self) -> None:
        self._start_s = time.monotonic()
        self.reads = 0

    def read(self) -> Reading:
        now_s = time.monotonic()
        self.reads += 1
        return Reading(now_s, 50.0 * (now_s - self._start_s), 50.0)

    def close(self) -> None:
        pass


def test_a_request_shorter_than_the_sampling_period_closes_the_interval_when_it_finishes() -> None:
    source = _ClockSource()
    meter = EnergyMeter(source, idle_w=0.0, sample_hz=0.5)  # the sampler ticks every 2 s
    meter.start()
    try:
        wait_for(lambda: source.reads >= 1)  # the sampler's first reading is the baseline
        assert source.reads == 1
        meter.start_request("short")
        time.sleep(0.2)  # the request itself: 0.2 s at 50 W
        meter.add_tokens("short", 7)
        energy_j = meter.finish_request("short")
    finally:
        meter.stop()
    assert energy_j == pytest.approx(50.0 * 0.2, rel=0.5)  # its own 0.2 s, not 0 J and not 2 s worth
    snap = meter.snapshot()
    assert snap.attributed_j == energy_j and snap.total_j == pytest.approx(snap.attributed_j + snap.unattributed_j)


class _FailingSource:
    """Works for `good_reads` readings, then reports itself unavailable (like NVML losing a GPU)."""

    name = "flaky"

    def __init__(self, good_reads: int):
        self.status: SourceStatus = "ok"
        self.reason = "fine"
        self._reads = 0
        self._good_reads = good_reads

    def read(self) -> Reading:
        self._reads += 1
        if self._reads > self._good_reads:
            self.status, self.reason = "unavailable", "GPU fell off the bus"
            return Reading(float(self._reads), None, None)
        return Reading(float(self._reads), 10.0 * self._reads, None)

    def close(self) -> None:
        pass


def test_sampler_stops_by_itself_when_the_source_fails() -> None:
    source = _FailingSource(good_reads=3)
    meter = EnergyMeter(source, idle_w=0.0, sample_hz=1000.0)
    meter.start()
    wait_for(lambda: not meter.sampling)
    assert not meter.sampling
    assert source._reads == 4
    snap = meter.snapshot()
    assert (snap.status, snap.reason, snap.total_j) == ("unavailable", "GPU fell off the bus", None)
    meter.stop()


# --- networked sources (a DCGM exporter) -------------------------------------------------------


class _NetworkedTrace(TraceSource):
    """A trace read "over the network": the meter must not read it while finishing a request."""

    networked = True

    def __init__(self, samples: list[tuple[float, float | None, float | None]]):
        super().__init__(samples)
        self.status: SourceStatus = "ok"
        self.reason = "replaying an exporter"


def test_finishing_a_request_never_reads_a_networked_source() -> None:
    trace = _NetworkedTrace([(0, 0.0, None), (1, 100.0, None)])
    meter = EnergyMeter(trace, idle_w=0.0, sample_hz=0.001)  # the sampler reads once, then waits
    meter.start()
    try:
        wait_for(lambda: trace._next >= 1)
        meter.start_request("a")
        meter.add_tokens("a", 5)
        assert meter.finish_request("a") is None  # no update of the exporter covered it: not measured, not 0 J
        assert trace._next == 1  # finishing did not scrape
    finally:
        meter.stop()


def test_a_request_that_finished_before_the_update_leaves_its_share_unattributed() -> None:
    trace = _NetworkedTrace([(0, 0.0, None), (1, 100.0, None), (2, 200.0, None)])
    meter = EnergyMeter(trace, idle_w=0.0)
    meter.tick(trace.read())
    meter.start_request("short")
    meter.start_request("long")
    meter.add_tokens("short", 30)
    meter.add_tokens("long", 10)
    assert meter.finish_request("short") is None  # the exporter had not updated yet: unknown, not 0 J
    meter.tick(trace.read())  # 100 J: 3/4 weighed by the departed request's tokens, not given to "long"
    assert meter.finish_request("long") == pytest.approx(25.0)
    snap = meter.snapshot()
    assert (snap.attributed_j, snap.unattributed_j) == (pytest.approx(25.0), pytest.approx(75.0))
    meter.tick(trace.read())  # nothing in flight any more: all unattributed, nobody's weight lingers
    assert meter.snapshot().unattributed_j == pytest.approx(175.0)


def test_a_networked_source_that_fails_is_still_sampled_and_its_requests_followed() -> None:
    source = _FailingSource(good_reads=2)
    source.networked = True
    meter = EnergyMeter(source, idle_w=0.0, sample_hz=1000.0)
    meter.start()
    try:
        wait_for(lambda: source._reads > 10)
        assert meter.sampling and meter.tracking and not meter.measuring
        meter.start_request("a")  # accepted while the source is down
        meter.add_tokens("a", 3)
        assert meter.finish_request("a") is None
    finally:
        meter.stop()
    snap = meter.snapshot()
    assert (snap.status, snap.reason, snap.total_j) == ("unavailable", "GPU fell off the bus", None)


def test_a_request_spanning_a_gap_has_no_energy_and_conservation_holds() -> None:
    trace = TraceSource([(0, 0.0, None), (1, 50.0, None), (2, None, None), (3, 120.0, None), (4, 150.0, None)])
    meter = EnergyMeter(trace, idle_w=0.0)
    meter.start_request("a")
    meter.start_request("b")
    for _ in range(2):
        meter.add_tokens("a", 1)
        meter.tick(trace.read())
    assert meter.finish_request("b") == 0.0  # started with the baseline: 50 J went to "a" alone (its tokens)
    meter.start_request("c")
    for _ in range(3):
        meter.add_tokens("a", 1)
        meter.add_tokens("c", 1)
        meter.tick(trace.read())
    assert meter.finish_request("a") is None  # 50 J + 15 J measured, but the gap's energy is unknown
    assert meter.finish_request("c") is None
    snap = meter.snapshot()
    assert (snap.gaps, snap.total_j, snap.attributed_j) == (2, pytest.approx(80.0), 0.0)
    assert snap.unattributed_j == pytest.approx(80.0) and snap.idle_j == 0.0


# --- several replicas ------------------------------------------------------------------------


def _snapshot(
    total_j: float | None, status: str = "ok", reason: str = "fine", power_w: float | None = 10.0
) -> EnergySnapshot:
    known = total_j is not None
    return EnergySnapshot(
        status, reason, "dcgm" if status == "ok" else "unavailable", total_j,
        total_j / 2 if known else None, total_j / 4 if known else None, total_j / 2 if known else None,
        total_j / 4 if known else None, power_w if known else None, 5.0 if known else None, False, 1, 10, 0, 1,
    )  # fmt: skip


def test_one_meter_is_shown_as_it_is() -> None:
    only = _snapshot(40.0)
    assert combined_snapshot([("this host", only)]) is only


def test_meters_are_summed_and_the_unmeasured_ones_named() -> None:
    both = combined_snapshot([("http://a:8001", _snapshot(40.0)), ("http://b:8001", _snapshot(60.0, power_w=30.0))])
    assert (both.status, both.source, both.total_j, both.active_j, both.idle_j) == ("ok", "dcgm", 100.0, 50.0, 50.0)
    assert (both.power_w, both.idle_w, both.gaps, both.requests_in_flight) == (40.0, 10.0, 2, 2)
    assert both.reason == "http://a:8001: fine; http://b:8001: fine"

    down = _snapshot(None, "unavailable", "DCGM exporter http://b:9400/metrics unreachable: connection refused")
    partial = combined_snapshot([("http://a:8001", _snapshot(40.0)), ("http://b:8001", down)])
    assert (partial.status, partial.total_j, partial.power_w) == ("ok", 40.0, 10.0)
    assert partial.reason == (
        "measured on 1 of 2 meters; not measured: http://b:8001: DCGM exporter http://b:9400/metrics unreachable: "
        "connection refused"
    )
    none = combined_snapshot([("this host", _snapshot(None, "unavailable", "no NVML")), ("http://b:8001", down)])
    assert (none.status, none.total_j, none.power_w, none.idle_w) == ("unavailable", None, None, None)
    assert none.reason.startswith("this host: no NVML; http://b:8001: DCGM exporter")


def test_each_replica_has_its_meter_and_one_meter_serves_all() -> None:
    local = EnergyMeter(UnavailableSource("no NVML"))
    remote = EnergyMeter(TraceSource([(0, 0.0, None)]), idle_w=0.0)
    meters = ReplicaMeters([
        ReplicaMeter(LOCAL_METER, local, ("http://127.0.0.1:8001",)),
        ReplicaMeter("http://gpu1:8001", remote, ("http://gpu1:8001",), "http://gpu1:9400/metrics"),
    ])  # fmt: skip
    assert meters.only is None
    assert meters.for_upstream("http://gpu1:8001") is remote and meters.for_upstream("http://127.0.0.1:8001") is local
    assert meters.for_upstream("gateway") is None
    assert meters.tracking and meters.power_limit_w() is None
    single = ReplicaMeters.single(local)
    assert single.only is local and single.for_upstream("gateway") is local
    with pytest.raises(ValueError):
        ReplicaMeters([])
