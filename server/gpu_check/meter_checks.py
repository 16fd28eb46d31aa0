"""The energy meter's checks: its arithmetic and sampler on the CPU, NVML and attribution on a GPU.

CPU side (runs everywhere, `cpu_checks()`):

* `trace_conservation`: the meter's arithmetic on replayed traces (counter with a reset, and
  instant power only), with requests reporting tokens and one that cannot: total equals the
  trace's own integral, idle is found, request + idle + unattributed energy == total, the
  request with more tokens gets more.
* `sampler_cpu_standin`: the sampler thread's CPU at 10 Hz reading a stand-in source whose
  `read()` is a clock read (the meter's own cost), plus the process CPU with and without it.

GPU side (needs NVML, and CUDA for the load; `gpu_checks()`):

* `gpu_info`: name, driver, NVML and CUDA driver versions, power limit, and whether the energy
  counter and the instant-power field are supported.
* `nvml_read_cost`: µs per `NvmlSource.read()` and per raw NVML query.
* `nvml_counter_vs_instant`: a bf16 matmul load in a background thread driven at duty cycles
  0/25/50/100%; per phase, the energy counter's increase against the trapezoid integral of
  instant power sampled at 50 Hz by a separate collector; |difference| <= 2% passes.
* `nvml_idle_baseline`: an `EnergyMeter(idle_w=None)` started in the 0% phase measures idle over
  its first 5 s; it must agree with the rest of that phase's mean power within 10%, and lie
  below the 100% phase's.
* `nvml_sampler_cpu`: the sampler thread's CPU at 10 Hz on the real NVML source, plus the process
  CPU with and without it; under 1% of one core passes.
* `nvml_attribution`: the meter on the live source while concurrent synthetic "requests"
  (threads doing matmuls, one token per step, one not reporting tokens, one starting late)
  start and finish: conservation, and a request with more tokens gets more energy.

PyTorch and pynvml are imported where they are used (or passed in as `torch`), never at import.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from server.gpu_check.results import CheckResult, Outcome, Skip, cuda_device, run_check, say, skipped
from server.telemetry.energy_attribution import EnergyMeter, EnergySnapshot
from server.telemetry.power_sources import NvmlSource, Reading, SteadySource, TraceSource
from server.telemetry.thread_cpu import ThreadCpuProbe

# Pass/fail thresholds (also written into the JSON).
COUNTER_VS_INSTANT_MAX_PCT = 2.0
IDLE_MAX_DEVIATION_PCT = 10.0
SAMPLER_MAX_CORE_PCT = 1.0  # the sampler thread at 10 Hz, in % of one core
NVML_READ_MAX_US = 1_000.0  # one NvmlSource.read(); at 10 Hz that is 1% of a core
CONSERVATION_REL = 1e-9  # float rounding of a few thousand additions

# The load and its measurement.
SAMPLER_HZ = 10.0
COLLECTOR_HZ = 50.0
DUTY_CYCLES = (0.0, 0.25, 0.5, 1.0)
DUTY_PERIOD_S = 0.5
SETTLE_S = 2.0  # readings this soon after a phase change are left out of its comparison
IDLE_WINDOW_S = 5.0
LOAD_MATRIX = 8192  # bf16 square matmuls for the duty-cycle load
REQUEST_MATRIX = 4096  # and for the synthetic requests
REQUEST_TOKEN_S = 0.004  # GPU time one synthetic "token" aims for


def _rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def conservation(snapshot: EnergySnapshot, request_j: Sequence[float]) -> dict[str, float]:
    """Sum of request energy + idle + unattributed against the total, and the attributed sum."""
    assert snapshot.total_j is not None and snapshot.idle_j is not None and snapshot.unattributed_j is not None
    accounted_j = math.fsum(request_j) + snapshot.idle_j + snapshot.unattributed_j
    return {
        "total_j": snapshot.total_j,
        "requests_j": math.fsum(request_j),
        "attributed_j": snapshot.attributed_j or 0.0,
        "idle_j": snapshot.idle_j,
        "unattributed_j": snapshot.unattributed_j,
        "accounted_j": accounted_j,
        "conservation_rel_error": _rel_diff(accounted_j, snapshot.total_j),
        "attributed_rel_error": _rel_diff(math.fsum(request_j), snapshot.attributed_j or 0.0),
    }


# --- CPU side: the meter's arithmetic on replayed traces ----------------------------------

TRACE_DT_S = 0.1
TRACE_IDLE_W = 80.0


def trace_power_w(index: int) -> float:
    """Idle for the first 6 s, then a load that swings between 180 and 520 W."""
    t = index * TRACE_DT_S
    return TRACE_IDLE_W if t < 6.0 else 350.0 + 170.0 * math.sin(1.3 * t)


def build_trace(readings: int, with_counter: bool, reset_at: int | None) -> list[tuple[float, float | None, float]]:
    """(time, counter, power) samples whose counter is the exact trapezoid integral of power.

    `reset_at`: from this reading on, the counter restarts near zero (a driver reload).
    """
    samples = []
    energy_j = 1_000.0
    for i in range(readings):
        if i:
            energy_j += (trace_power_w(i - 1) + trace_power_w(i)) / 2 * TRACE_DT_S
        if reset_at is not None and i == reset_at:
            energy_j = 3.0
        samples.append((100.0 + i * TRACE_DT_S, energy_j if with_counter else None, trace_power_w(i)))
    return samples


def replay(samples: list[tuple[float, float | None, float]]) -> dict[str, Any]:
    """Replay `samples` through a meter with requests starting and finishing along the way."""
    source = TraceSource(samples)
    meter = EnergyMeter(source, idle_w=None, idle_window_s=IDLE_WINDOW_S)
    # reading index -> requests starting (name, reports tokens) or finishing just before/after it
    starts = {65: [("a", True), ("b", True), ("silent", False)], 90: [("late", True)]}
    finishes = {120: ["a"], 130: ["late"], 140: ["b", "silent"]}
    tokens = {"a": 10, "b": 20, "late": 10}  # reported before every reading while running
    running: set[str] = set()
    energy_j: dict[str, float] = {}
    for index in range(len(samples)):
        for request, reports in starts.get(index, []):
            meter.start_request(request, reports_tokens=reports)
            running.add(request)
        for request in running:
            if request in tokens:
                meter.add_tokens(request, tokens[request])
        meter.tick(source.read())
        for request in finishes.get(index, []):
            energy_j[request] = meter.finish_request(request) or 0.0
            running.discard(request)
    snapshot = meter.snapshot()
    expected_total_j = math.fsum(
        (trace_power_w(i - 1) + trace_power_w(i)) / 2 * TRACE_DT_S for i in range(1, len(samples))
    )
    return {
        "readings": len(samples),
        "expected_total_j": expected_total_j,
        "idle_w": snapshot.idle_w,
        "resets": snapshot.resets,
        "gaps": snapshot.gaps,
        "request_j": energy_j,
        **conservation(snapshot, list(energy_j.values())),
    }


def check_trace_conservation() -> Outcome:
    say("trace: one replay plants a counter reset; the meter's warning about it is expected")
    variants = {
        "counter_with_reset": replay(build_trace(160, with_counter=True, reset_at=100)),
        "instant_power_only": replay(build_trace(160, with_counter=False, reset_at=None)),
    }
    outcome = Outcome("", {"variants": variants})
    for name, v in variants.items():
        outcome.require(
            _rel_diff(v["total_j"], v["expected_total_j"]) <= CONSERVATION_REL,
            f"{name}: total {v['total_j']:.6f} J is not the trace's integral {v['expected_total_j']:.6f} J",
        )
        outcome.require(
            v["idle_w"] is not None and _rel_diff(v["idle_w"], TRACE_IDLE_W) <= CONSERVATION_REL,
            f"{name}: idle {v['idle_w']} W, expected {TRACE_IDLE_W} W",
        )
        outcome.require(
            v["conservation_rel_error"] <= CONSERVATION_REL,
            f"{name}: requests + idle + unattributed off the total by {v['conservation_rel_error']:.2e}",
        )
        r = v["request_j"]
        outcome.require(r["b"] > r["a"] > 0, f"{name}: 20 tokens/interval got {r['b']:.1f} J, 10 got {r['a']:.1f} J")
        outcome.require(r["silent"] > 0 and r["late"] > 0, f"{name}: a request got no energy: {r}")
    reset = variants["counter_with_reset"]
    outcome.require(reset["resets"] == 1, f"counter reset seen {reset['resets']} times, expected once")
    worst = max(v["conservation_rel_error"] for v in variants.values())
    outcome.summary = (
        f"2 traces × 160 readings: conservation rel err ≤ {worst:.1e}, idle {TRACE_IDLE_W:g} W found, "
        f"reset handled, more tokens → more J"
    )
    return outcome


# --- sampler CPU ---------------------------------------------------------------------------


def measure_sampler_cpu(source: Any, window_s: float, rounds: int, hz: float = SAMPLER_HZ) -> dict[str, Any]:
    """The sampler thread's CPU at `hz` on `source`, and the process CPU with and without it.

    Windows alternate (none, sampler, none, sampler, ...) so drift hits both alike. The thread's
    CPU is `time.thread_time()` read inside it at each reading: whole loop iterations (read,
    tick over 8 open requests, wait, wake). `source` is not closed.
    """
    thread_cpu_s = span_s = 0.0
    ticks = 0
    process_s = {"without": 0.0, "with": 0.0}
    wall_s = {"without": 0.0, "with": 0.0}
    for _ in range(rounds):
        for variant in ("without", "with"):
            cpu0, wall0 = time.process_time(), time.monotonic()
            if variant == "without":
                time.sleep(window_s)
            else:
                probe = ThreadCpuProbe(source)
                meter = EnergyMeter(probe, idle_w=0.0, sample_hz=hz)
                for request in range(8):
                    meter.start_request(request)
                meter.start()
                try:
                    time.sleep(window_s)
                finally:
                    meter.stop()
                if len(probe.threads) != 1:
                    raise RuntimeError("the source was read from more than one thread")
                if len(probe.thread_cpu_s) >= 2:
                    ticks += len(probe.thread_cpu_s) - 1
                    span_s += probe.wall_s[-1] - probe.wall_s[0]
                    thread_cpu_s += probe.thread_cpu_s[-1] - probe.thread_cpu_s[0]
            process_s[variant] += time.process_time() - cpu0
            wall_s[variant] += time.monotonic() - wall0
    without_pct = 100.0 * process_s["without"] / wall_s["without"]
    with_pct = 100.0 * process_s["with"] / wall_s["with"]
    return {
        "source": source.reason,
        "hz": hz,
        "window_s": window_s,
        "rounds": rounds,
        "ticks": ticks,
        "achieved_hz": ticks / span_s if span_s else None,
        "thread_cpu_s": thread_cpu_s,
        "thread_cpu_pct_of_core": 100.0 * thread_cpu_s / span_s if span_s else None,
        "us_per_tick": thread_cpu_s / ticks * 1e6 if ticks else None,
        "process_cpu_pct_without_sampler": without_pct,
        "process_cpu_pct_with_sampler": with_pct,
        "process_cpu_pct_added": with_pct - without_pct,
    }


def sampler_outcome(metrics: dict[str, Any]) -> Outcome:
    pct = metrics["thread_cpu_pct_of_core"]
    outcome = Outcome(
        f"{metrics['ticks']} ticks at {metrics['achieved_hz'] or 0:.1f} Hz: thread {pct or 0:.3f}% of a core, "
        f"{metrics['us_per_tick'] or 0:.0f} µs/tick; process +{metrics['process_cpu_pct_added']:.2f} pts",
        metrics,
    )
    outcome.require(metrics["ticks"] > 0, "the sampler never read the source")
    outcome.require(
        pct is not None and pct <= SAMPLER_MAX_CORE_PCT,
        f"sampler thread {pct}% of a core at {metrics['hz']:g} Hz, above {SAMPLER_MAX_CORE_PCT}%",
    )
    return outcome


# --- GPU side: NVML ------------------------------------------------------------------------


def open_nvml(torch_device: Any | None) -> tuple[NvmlSource, list[Any] | None]:
    """An NvmlSource for the GPU the load runs on (by UUID); all visible GPUs if that fails."""
    if torch_device is not None:
        import torch

        try:
            uuid = getattr(torch.cuda.get_device_properties(torch_device), "uuid", None)
        except Exception as error:  # an old or unusual build: measure all visible GPUs instead
            say(f"nvml: cannot read the CUDA device's UUID ({error}); measuring every visible GPU")
            uuid = None
        if uuid is not None:
            device_id = str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}"
            source = NvmlSource([device_id])
            if source.status == "ok":
                return source, [device_id]
            say(f"nvml: {device_id} not found by NVML ({source.reason}); measuring every visible GPU")
            source.close()
    return NvmlSource(), None


def _nvml_handle(devices: list[Any] | None) -> Any:
    import pynvml

    if devices:
        return pynvml.nvmlDeviceGetHandleByUUID(devices[0])
    return pynvml.nvmlDeviceGetHandleByIndex(0)


def _try(query: Callable[[], Any]) -> Any:
    try:
        value = query()
    except Exception as error:  # NVMLError_NotSupported and friends: record, don't fail
        return f"unavailable: {type(error).__name__}"
    return value.decode() if isinstance(value, bytes) else value


def instant_power_mw(handle: Any) -> float | None:
    """NVML_FI_DEV_POWER_INSTANT in mW, or None where the board or driver lacks it."""
    import pynvml

    try:
        (value,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
    except (pynvml.NVMLError, AttributeError):
        return None
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        return None
    from server.telemetry.power_sources import _field_value

    return float(_field_value(value))


def check_gpu_info(source: NvmlSource, devices: list[Any] | None) -> Outcome:
    import pynvml

    handle = _nvml_handle(devices)
    counter = _try(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    limit_mw = _try(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    info = {
        "name": _try(lambda: pynvml.nvmlDeviceGetName(handle)),
        "uuid": _try(lambda: pynvml.nvmlDeviceGetUUID(handle)),
        "driver": _try(pynvml.nvmlSystemGetDriverVersion),
        "nvml_version": _try(pynvml.nvmlSystemGetNVMLVersion),
        "cuda_driver_version": _try(pynvml.nvmlSystemGetCudaDriverVersion),
        "gpu_count": _try(pynvml.nvmlDeviceGetCount),
        "measured_devices": devices or "all visible (CUDA_VISIBLE_DEVICES or every GPU)",
        "source_reason": source.reason,
        "power_limit_w": limit_mw / 1000 if isinstance(limit_mw, int) else limit_mw,
        "power_limit_range_w": _try(
            lambda: [mw / 1000 for mw in pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)]
        ),
        "energy_counter_supported": isinstance(counter, int),
        "energy_counter_j": counter / 1000 if isinstance(counter, int) else counter,
        "instant_power_supported": instant_power_mw(handle) is not None,
        "power_usage_w": _try(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        "pstate": _try(lambda: pynvml.nvmlDeviceGetPerformanceState(handle)),
        "temperature_c": _try(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        "persistence_mode": _try(lambda: pynvml.nvmlDeviceGetPersistenceMode(handle)),
    }
    return Outcome(
        f"{info['name']}, driver {info['driver']}, NVML {info['nvml_version']}, limit {info['power_limit_w']} W; "
        f"energy counter {'yes' if info['energy_counter_supported'] else 'NO'}, "
        f"instant field {'yes' if info['instant_power_supported'] else 'NO (averaged power instead)'}",
        info,
    )


def _timed_us(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - started) / 1e3)
    samples.sort()
    return {
        "median_us": statistics.median(samples),
        "p95_us": samples[int(0.95 * (len(samples) - 1))],
        "max_us": samples[-1],
    }


def check_nvml_read_cost(source: NvmlSource, devices: list[Any] | None, repeats: int = 500) -> Outcome:
    import pynvml

    handle = _nvml_handle(devices)
    cpu0 = time.thread_time()
    wall0 = time.perf_counter()
    source_read = _timed_us(source.read, repeats)
    cpu_per_read_us = (time.thread_time() - cpu0) / repeats * 1e6
    wall_per_read_us = (time.perf_counter() - wall0) / repeats * 1e6
    metrics: dict[str, Any] = {
        "repeats": repeats,
        "source_read": source_read,
        "source_read_cpu_us": cpu_per_read_us,
        "source_read_wall_us": wall_per_read_us,
        "energy_counter": _timed_us(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), repeats),
        "instant_field": _timed_us(lambda: instant_power_mw(handle), repeats),
        "power_usage": _timed_us(lambda: pynvml.nvmlDeviceGetPowerUsage(handle), repeats),
    }
    median = source_read["median_us"]
    outcome = Outcome(
        f"NvmlSource.read() {median:.0f} µs median ({cpu_per_read_us:.0f} µs CPU); counter "
        f"{metrics['energy_counter']['median_us']:.0f} µs, "
        f"instant field {metrics['instant_field']['median_us']:.0f} µs",
        metrics,
    )
    outcome.require(median <= NVML_READ_MAX_US, f"a read takes {median:.0f} µs, above {NVML_READ_MAX_US:.0f} µs")
    return outcome


# --- GPU side: the synthetic load ------------------------------------------------------------


def _settle_inputs(torch: Any, device: Any) -> None:
    """Wait for the default stream (which filled the inputs) before other streams read them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DutyCycleLoad:
    """bf16 matmuls on `device` in a background thread, busy for `duty` of every `period_s`.

    Busy means batches of matmuls, each followed by a synchronize of the thread's own stream, until
    the busy share of the period is used; then it sleeps to the period's end. `busy_s` and
    `wall_s` per duty say what was achieved.
    """

    def __init__(self, torch: Any, device: Any, size: int = LOAD_MATRIX, period_s: float = DUTY_PERIOD_S):
        self._torch = torch
        self._device = device
        self._period_s = period_s
        generator = torch.Generator(device=device).manual_seed(0)
        self._a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        self._b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        self._c = torch.empty(size, size, device=device, dtype=torch.bfloat16)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        _settle_inputs(torch, device)
        self.matmul_s = self._calibrate()
        self._batch = max(1, round(0.010 / self.matmul_s))  # about 10 ms of GPU work per batch
        self.duty = 0.0
        self.busy_s: dict[float, float] = {}
        self.wall_s: dict[float, float] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="duty-cycle-load", daemon=True)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _matmuls(self, count: int) -> None:
        torch = self._torch
        if self._stream is None:
            for _ in range(count):
                torch.matmul(self._a, self._b, out=self._c)
            return
        with torch.cuda.stream(self._stream):
            for _ in range(count):
                torch.matmul(self._a, self._b, out=self._c)
        self._stream.synchronize()

    def _calibrate(self) -> float:
        self._matmuls(3)  # warm-up: cuBLAS handle, kernel selection
        count = 5
        while True:
            started = time.perf_counter()
            self._matmuls(count)
            elapsed = time.perf_counter() - started
            if elapsed > 0.05 or count > 10_000:
                return elapsed / count
            count *= 4

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"the load thread failed: {self._error}") from self._error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                duty = self.duty
                period_start = time.perf_counter()
                busy_until = period_start + duty * self._period_s
                busy = 0.0
                while duty > 0 and time.perf_counter() < busy_until and not self._stop.is_set():
                    started = time.perf_counter()
                    self._matmuls(self._batch)
                    busy += time.perf_counter() - started
                rest = period_start + self._period_s - time.perf_counter()
                if rest > 0:
                    self._stop.wait(rest)
                self.busy_s[duty] = self.busy_s.get(duty, 0.0) + busy
                self.wall_s[duty] = self.wall_s.get(duty, 0.0) + time.perf_counter() - period_start
        except BaseException as error:  # reported by stop()
            self._error = error


class Collector:
    """Reads the source at `hz` in its own thread, labelling each reading with the current phase."""

    def __init__(self, source: Any, hz: float = COLLECTOR_HZ):
        self._source = source
        self._period_s = 1.0 / hz
        self.phase = "start"
        self.readings: list[tuple[str, Reading]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="power-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        next_s = time.monotonic()
        while not self._stop.is_set():
            self.readings.append((self.phase, self._source.read()))
            next_s += self._period_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def phase_readings(self, phase: str, since_s: float) -> list[Reading]:
        return [r for p, r in self.readings if p == phase and r.time_s >= since_s]


def _changes(values: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """How often a series of (time, value) actually changed value: distinct updates and their spacing."""
    change_times = [t for (t0, v0), (t, v) in itertools.pairwise(values) if v != v0]
    spacing = [b - a for a, b in itertools.pairwise(change_times)]
    return {
        "updates": len(change_times),
        "median_update_interval_ms": statistics.median(spacing) * 1e3 if spacing else None,
    }


def compare_counter_and_instant(readings: Sequence[Reading]) -> dict[str, Any]:
    """The counter's increase against the trapezoid integral of instant power over the same readings.

    Returns both energies (J), their mean powers (W), the difference in % of the counter
    (positive: instant power integrates to more), and how often each value really updated.
    """
    usable = [(r.time_s, r.energy_j, r.power_w) for r in readings if r.energy_j is not None and r.power_w is not None]
    if len(usable) < 3:
        raise ValueError(f"only {len(usable)} readings with both counter and power")
    times_s = [time_s for time_s, _, _ in usable]
    energies_j = [energy_j for _, energy_j, _ in usable]
    powers_w = [power_w for _, _, power_w in usable]
    duration_s = times_s[-1] - times_s[0]
    counter_j = energies_j[-1] - energies_j[0]
    power_series = list(zip(times_s, powers_w, strict=True))
    integral_j = math.fsum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(power_series))
    return {
        "readings": len(usable),
        "duration_s": duration_s,
        "sample_hz": (len(usable) - 1) / duration_s if duration_s else None,
        "counter_j": counter_j,
        "instant_integral_j": integral_j,
        "counter_mean_w": counter_j / duration_s if duration_s else None,
        "instant_mean_w": integral_j / duration_s if duration_s else None,
        "diff_pct": 100.0 * (integral_j - counter_j) / counter_j if counter_j > 0 else None,
        "counter_resets": sum(1 for a_j, b_j in itertools.pairwise(energies_j) if b_j < a_j),
        "counter": _changes(list(zip(times_s, energies_j, strict=True))),
        "instant": _changes(power_series),
    }


@dataclass
class PhaseRun:
    """What the duty-cycle phases produced, for the checks that read it."""

    phases: dict[str, dict[str, Any]]
    idle_meter: EnergySnapshot
    idle_meter_started_s: float
    idle_meter_window_end_s: float | None
    zero_phase_rest_w: float | None
    load_calibration: dict[str, Any]
    idle_window_s: float


def run_duty_phases(
    torch: Any,
    device: Any,
    source: Any,
    phase_s: float,
    *,
    matrix: int = LOAD_MATRIX,
    settle_s: float = SETTLE_S,
    idle_window_s: float = IDLE_WINDOW_S,
) -> PhaseRun:
    """0% (longer: idle baseline), 25%, 50%, 100%, with the collector and an idle-measuring meter.

    The 0% phase waits `settle_s`, then starts an `EnergyMeter(idle_w=None)` that measures idle
    over `idle_window_s`, and goes on for `phase_s` more. Each phase's comparison leaves out its
    first `settle_s`.
    """
    say(f"load: {matrix}² bf16 matmuls, calibrating")
    load = DutyCycleLoad(torch, device, size=matrix)
    flop = 2 * matrix**3
    calibration = {
        "matrix": matrix,
        "matmul_ms": load.matmul_s * 1e3,
        "tflops": flop / load.matmul_s / 1e12,
        "batch": load._batch,
        "period_s": DUTY_PERIOD_S,
    }
    say(f"load: one matmul {load.matmul_s * 1e3:.2f} ms ({calibration['tflops']:.0f} TFLOP/s), batch {load._batch}")
    collector = Collector(source)
    idle_meter = EnergyMeter(source, idle_w=None, idle_window_s=idle_window_s, sample_hz=SAMPLER_HZ)
    phases: dict[str, dict[str, Any]] = {}
    idle_started_s = 0.0
    idle_end_s: float | None = None
    zero_rest_w: float | None = None
    load.start()
    collector.start()
    try:
        for duty in DUTY_CYCLES:
            name = f"{duty:.0%}"
            seconds = phase_s + (settle_s + idle_window_s if duty == 0 else 0.0)
            say(f"phase {name}: {seconds:.0f} s")
            load.duty = duty
            collector.phase = name
            phase_start_s = time.monotonic()
            if duty == 0:
                time.sleep(settle_s)
                idle_started_s = time.monotonic()
                idle_meter.start()
                time.sleep(idle_window_s + 2 / SAMPLER_HZ)
                idle_end_s = time.monotonic()
                time.sleep(max(0.0, seconds - (time.monotonic() - phase_start_s)))
            else:
                time.sleep(seconds)
            phases[name] = {"duty": duty, "seconds": seconds, "started_s": phase_start_s}
        collector.phase = "end"
    finally:
        collector.stop()
        load.stop()
        idle_meter.stop()
    for name, phase in phases.items():
        readings = collector.phase_readings(name, phase["started_s"] + settle_s)
        phase.update(compare_counter_and_instant(readings))
        duty = phase["duty"]
        wall = load.wall_s.get(duty, 0.0)
        phase["achieved_duty"] = load.busy_s.get(duty, 0.0) / wall if wall else None
        if name == "0%" and idle_end_s is not None:
            rest = collector.phase_readings(name, idle_end_s)
            zero_rest_w = compare_counter_and_instant(rest)["counter_mean_w"] if len(rest) >= 3 else None
    return PhaseRun(phases, idle_meter.snapshot(), idle_started_s, idle_end_s, zero_rest_w, calibration, idle_window_s)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}%"


def check_counter_vs_instant(run: PhaseRun) -> Outcome:
    table = {
        name: {k: p[k] for k in ("achieved_duty", "counter_mean_w", "instant_mean_w", "diff_pct", "sample_hz")}
        for name, p in run.phases.items()
    }
    outcome = Outcome(
        "; ".join(f"{name}: {p['counter_mean_w']:.0f} W {_pct(p['diff_pct'])}" for name, p in run.phases.items()),
        {"phases": run.phases, "table": table, "load": run.load_calibration, "max_abs_diff_pct": None},
    )
    diffs = [p["diff_pct"] for p in run.phases.values() if p["diff_pct"] is not None]
    outcome.metrics["max_abs_diff_pct"] = max((abs(d) for d in diffs), default=None)
    for name, p in run.phases.items():
        outcome.require(p["diff_pct"] is not None, f"{name}: the counter did not move")
        if p["diff_pct"] is not None:
            outcome.require(
                abs(p["diff_pct"]) <= COUNTER_VS_INSTANT_MAX_PCT,
                f"{name}: instant power integrates to {p['diff_pct']:+.2f}% of the counter "
                f"(limit ±{COUNTER_VS_INSTANT_MAX_PCT}%)",
            )
        outcome.require(p["counter_resets"] == 0, f"{name}: the counter went down {p['counter_resets']} times")
    return outcome


def check_idle_baseline(run: PhaseRun) -> Outcome:
    snap = run.idle_meter
    full_w = run.phases["100%"]["counter_mean_w"]
    idle_w = snap.idle_w
    rest_w = run.zero_phase_rest_w
    deviation = 100.0 * (idle_w - rest_w) / rest_w if idle_w is not None and rest_w else None
    metrics = {
        "idle_w": idle_w,
        "idle_measuring": snap.idle_measuring,
        "zero_phase_rest_mean_w": rest_w,
        "deviation_pct": deviation,
        "full_load_w": full_w,
        "meter": asdict(snap),
        **conservation(snap, []),
    }
    outcome = Outcome(
        f"idle {idle_w or 0:.1f} W over the first {run.idle_window_s:g} s; rest of 0% phase {rest_w or 0:.1f} W "
        f"({deviation or 0:+.1f}%); 100% phase {full_w or 0:.0f} W",
        metrics,
    )
    outcome.require(idle_w is not None and not snap.idle_measuring, "the meter never finished measuring idle")
    if idle_w is not None and deviation is not None:
        outcome.require(
            abs(deviation) <= IDLE_MAX_DEVIATION_PCT,
            f"idle {idle_w:.1f} W is {deviation:+.1f}% off the 0% phase's later mean {rest_w:.1f} W",
        )
        outcome.require(full_w is not None and full_w > idle_w, f"full load {full_w} W not above idle {idle_w} W")
    outcome.require(
        metrics["conservation_rel_error"] <= CONSERVATION_REL,
        f"idle + unattributed off the total by {metrics['conservation_rel_error']:.2e}",
    )
    return outcome


# --- GPU side: attribution with concurrent synthetic requests ------------------------------


@dataclass
class SyntheticRequest:
    name: str
    tokens: int
    reports_tokens: bool = True
    delay_s: float = 0.0
    energy_j: float | None = None
    started_s: float = 0.0
    finished_s: float = 0.0


class RequestWork:
    """One "token" = a few bf16 matmuls on the request thread's own CUDA stream, then a sync."""

    def __init__(self, torch: Any, device: Any, size: int = REQUEST_MATRIX):
        self._torch = torch
        self._device = device
        self._size = size
        generator = torch.Generator(device=device).manual_seed(1)
        self._a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        self._b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        _settle_inputs(torch, device)
        self.matmuls_per_token = 1
        self.matmul_s = self._time_tokens()  # one matmul per token while calibrating
        self.matmuls_per_token = max(1, round(REQUEST_TOKEN_S / self.matmul_s))
        self.token_s = self._time_tokens()

    def _time_tokens(self) -> float:
        """Seconds per token, timed over at least 50 ms of them after a warm-up."""
        stream = self.new_stream()
        self.token(stream)
        count = 4
        while True:
            started = time.perf_counter()
            for _ in range(count):
                self.token(stream)
            elapsed = time.perf_counter() - started
            if elapsed > 0.05 or count > 100_000:
                return elapsed / count
            count *= 4

    def describe(self) -> str:
        return f"a token = {self.matmuls_per_token} × {self._size}² bf16 matmuls, {self.token_s * 1e3:.1f} ms alone"

    def new_stream(self) -> Any:
        return self._torch.cuda.Stream(self._device) if self._device.type == "cuda" else None

    def token(self, stream: Any) -> None:
        torch = self._torch
        if stream is None:
            for _ in range(self.matmuls_per_token):
                torch.matmul(self._a, self._b)
            return
        with torch.cuda.stream(stream):
            for _ in range(self.matmuls_per_token):
                torch.matmul(self._a, self._b)
        stream.synchronize()


def run_requests(meter: EnergyMeter, work: RequestWork, requests: Sequence[SyntheticRequest]) -> list[SyntheticRequest]:
    """Each request in its own thread: start, its tokens (reported one by one, or not), finish."""
    errors: list[BaseException] = []
    begin = threading.Barrier(len(requests))

    def serve(request: SyntheticRequest) -> None:
        try:
            stream = work.new_stream()
            begin.wait()
            time.sleep(request.delay_s)
            request.started_s = time.monotonic()
            meter.start_request(request.name, reports_tokens=request.reports_tokens)
            for _ in range(request.tokens):
                work.token(stream)
                if request.reports_tokens:
                    meter.add_tokens(request.name, 1)
            request.energy_j = meter.finish_request(request.name)
            request.finished_s = time.monotonic()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(r,), name=f"request-{r.name}") for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a request thread failed: {errors[0]!r}") from errors[0]
    return list(requests)


def attribution_plan(token_s: float, target_s: float) -> list[SyntheticRequest]:
    """Three reporters of 1, 2 and 4 units starting together, a silent one of 2, a late one of 1.

    A unit is sized so that all ten units of GPU work take about `target_s` one after another, and
    is at least 20 tokens, so that each request spans several sampler intervals.
    """
    unit = max(20, round(target_s / (10 * token_s)))
    return [
        SyntheticRequest("small", unit),
        SyntheticRequest("medium", 2 * unit),
        SyntheticRequest("large", 4 * unit),
        SyntheticRequest("silent", 2 * unit, reports_tokens=False),
        SyntheticRequest("late", unit, delay_s=target_s / 5),
    ]


def attribution_outcome(requests: Sequence[SyntheticRequest], snap: EnergySnapshot, extra: dict[str, Any]) -> Outcome:
    by_name = {r.name: r for r in requests}
    energies = [r.energy_j or 0.0 for r in requests]
    metrics = {
        **extra,
        **conservation(snap, energies),
        "requests": [
            {
                **asdict(r),
                "seconds": r.finished_s - r.started_s,
                "j_per_token": (r.energy_j or 0.0) / r.tokens if r.tokens else None,
            }
            for r in requests
        ],
        "meter": asdict(snap),
    }
    small, medium, large = (by_name[n].energy_j or 0.0 for n in ("small", "medium", "large"))
    outcome = Outcome(
        f"{len(requests)} requests: "
        + ", ".join(f"{r.name} {r.tokens} tok {r.energy_j or 0:.0f} J" for r in requests)
        + f"; conservation rel err {metrics['conservation_rel_error']:.1e}",
        metrics,
    )
    outcome.require(
        metrics["conservation_rel_error"] <= CONSERVATION_REL,
        f"requests + idle + unattributed = {metrics['accounted_j']:.6f} J, total {metrics['total_j']:.6f} J",
    )
    outcome.require(
        metrics["attributed_rel_error"] <= CONSERVATION_REL,
        f"request energies sum to {metrics['requests_j']:.6f} J, attributed {metrics['attributed_j']:.6f} J",
    )
    outcome.require(
        large > medium > small > 0,
        f"energy not ordered by tokens: {small:.1f} < {medium:.1f} < {large:.1f} J expected",
    )
    outcome.require(all(e > 0 for e in energies), f"a request got no energy: {energies}")
    outcome.require(snap.gaps == 0 and snap.resets == 0, f"{snap.gaps} gaps and {snap.resets} resets while measuring")
    return outcome


def check_attribution(
    torch: Any, device: Any, source: Any, idle_w: float | None, target_s: float, *, work: Any = None
) -> Outcome:
    """`work` (default: `RequestWork` on `device`) needs `token_s`, `new_stream()` and `token(stream)`."""
    work = RequestWork(torch, device) if work is None else work
    plan = attribution_plan(work.token_s, target_s)
    say(f"attribution: {work.describe()}; " + ", ".join(f"{r.name} {r.tokens}" for r in plan))
    meter = EnergyMeter(source, idle_w=idle_w, idle_window_s=1.0, sample_hz=SAMPLER_HZ)
    meter.start()
    try:
        time.sleep(1.2)  # a baseline reading, and an idle estimate when none was measured before
        started = time.monotonic()
        requests = run_requests(meter, work, plan)
        elapsed = time.monotonic() - started
        time.sleep(0.5)
    finally:
        meter.stop()
    extra = {
        "idle_w_given": idle_w,
        "token": work.describe(),
        "requests_wall_s": elapsed,
    }
    return attribution_outcome(requests, meter.snapshot(), extra)


# --- the groups the runner calls -----------------------------------------------------------


def cpu_checks() -> list[CheckResult]:
    """The meter's checks that need no GPU: replayed traces, and the sampler on a stand-in source."""
    return [
        run_check(
            "trace_conservation",
            "cpu",
            "EnergyMeter arithmetic on replayed traces (TraceSource)",
            check_trace_conservation,
        ),
        run_check(
            "sampler_cpu_standin",
            "cpu",
            f"sampler thread CPU at {SAMPLER_HZ:g} Hz on a stand-in source (≤ {SAMPLER_MAX_CORE_PCT}% of a core)",
            lambda: sampler_outcome(measure_sampler_cpu(SteadySource(300.0), window_s=2.0, rounds=2)),
        ),
    ]


GPU_CHECKS = {
    "gpu_info": "GPU, driver, NVML, power limit, counter and instant-field support",
    "nvml_read_cost": "µs per NVML read",
    "nvml_counter_vs_instant": (
        f"energy counter vs ∫ instant power, duty cycles 0/25/50/100% (±{COUNTER_VS_INSTANT_MAX_PCT}%)"
    ),
    "nvml_idle_baseline": f"EnergyMeter idle baseline in the 0% phase (±{IDLE_MAX_DEVIATION_PCT:g}%)",
    "nvml_sampler_cpu": f"sampler thread CPU at {SAMPLER_HZ:g} Hz on NVML (≤ {SAMPLER_MAX_CORE_PCT}% of a core)",
    "nvml_attribution": "concurrent synthetic requests on the live meter: conservation, more tokens → more J",
}


def gpu_checks(phase_seconds: float, attribution_seconds: float) -> list[CheckResult]:
    """Every NVML check, sharing one source and one run of the duty-cycle phases.

    `phase_seconds` per duty-cycle phase; the synthetic requests keep the GPU busy for about
    `attribution_seconds`.
    """
    import torch

    try:
        device = cuda_device()
        cuda_reason = None
    except Skip as skip:
        device, cuda_reason = None, str(skip)
    source, devices = open_nvml(device)
    results: list[CheckResult] = []
    try:
        if source.status != "ok":
            return [skipped(name, "gpu", title, source.reason) for name, title in GPU_CHECKS.items()]
        results.append(run_check("gpu_info", "gpu", GPU_CHECKS["gpu_info"], lambda: check_gpu_info(source, devices)))
        results.append(
            run_check(
                "nvml_read_cost", "gpu", GPU_CHECKS["nvml_read_cost"], lambda: check_nvml_read_cost(source, devices)
            )
        )
        if device is None:
            reason = f"{cuda_reason} (needed for the synthetic load)"
            for name in ("nvml_counter_vs_instant", "nvml_idle_baseline"):
                results.append(skipped(name, "gpu", GPU_CHECKS[name], reason))
        else:
            phase_run: dict[str, PhaseRun] = {}
            info = results[0].metrics

            def counter_vs_instant() -> Outcome:
                phase_run["run"] = run_duty_phases(torch, device, source, phase_seconds)
                if not info.get("energy_counter_supported", True):
                    raise Skip("this GPU has no energy counter: the meter integrates power itself, nothing to compare")
                outcome = check_counter_vs_instant(phase_run["run"])
                if not info.get("instant_power_supported", True):
                    outcome.failures.append(
                        "no instant-power field: compared with averaged power (nvmlDeviceGetPowerUsage)"
                    )
                return outcome

            results.append(
                run_check("nvml_counter_vs_instant", "gpu", GPU_CHECKS["nvml_counter_vs_instant"], counter_vs_instant)
            )

            def idle_baseline() -> Outcome:
                if "run" not in phase_run:
                    raise Skip("the duty-cycle phases did not complete (see nvml_counter_vs_instant)")
                return check_idle_baseline(phase_run["run"])

            results.append(run_check("nvml_idle_baseline", "gpu", GPU_CHECKS["nvml_idle_baseline"], idle_baseline))
        results.append(
            run_check(
                "nvml_sampler_cpu",
                "gpu",
                GPU_CHECKS["nvml_sampler_cpu"],
                lambda: sampler_outcome(measure_sampler_cpu(source, window_s=4.0, rounds=2)),
            )
        )
        if device is None:
            reason = f"{cuda_reason} (needed for the synthetic requests)"
            results.append(skipped("nvml_attribution", "gpu", GPU_CHECKS["nvml_attribution"], reason))
        else:
            idle = next((r for r in results if r.name == "nvml_idle_baseline"), None)
            idle_w = idle.metrics.get("idle_w") if idle is not None and idle.status == "passed" else None
            results.append(
                run_check(
                    "nvml_attribution",
                    "gpu",
                    GPU_CHECKS["nvml_attribution"],
                    lambda: check_attribution(torch, device, source, idle_w, attribution_seconds),
                )
            )
    finally:
        source.close()
        if device is not None:
            torch.cuda.empty_cache()
    return results
