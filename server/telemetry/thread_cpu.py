"""The energy sampler's own CPU: a power source wrapper that notes the reading thread's CPU time.

    probe = ThreadCpuProbe(source)
    meter = EnergyMeter(probe, idle_w=0.0, sample_hz=10.0)
    ...  # start the meter, let it run, stop it
    cpu_s = probe.thread_cpu_s[-1] - probe.thread_cpu_s[0]  # over probe.wall_s[-1] - probe.wall_s[0]

Used by `student gpu-check` (`server.gpu_check`) and the telemetry benchmark (`benchmarks.telemetry_cost`).
"""

from __future__ import annotations

import threading
import time

from server.telemetry.power_sources import PowerSource, Reading, SourceStatus


class ThreadCpuProbe:
    """Wraps a source and notes, at every `read()`, the reading thread's CPU time and the clock.

    CPU between the first and last reading covers whole sampler-loop iterations: read, tick,
    wait, wake. The probe itself adds two clock reads and a few appends per tick (~0.5 µs).
    `threads` holds every thread that read, so a caller can check there was only one. The
    wrapped source stays the caller's: `close()` leaves it open.
    """

    def __init__(self, source: PowerSource):
        self._source = source
        self.name: str = source.name
        self.status: SourceStatus = source.status
        self.reason: str = source.reason
        self.thread_cpu_s: list[float] = []
        self.wall_s: list[float] = []
        self.threads: set[int] = set()

    def read(self) -> Reading:
        self.thread_cpu_s.append(time.thread_time())
        self.wall_s.append(time.monotonic())
        self.threads.add(threading.get_ident())
        return self._source.read()

    def close(self) -> None:
        pass
