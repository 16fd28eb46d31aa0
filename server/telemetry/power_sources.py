"""Device access for the energy meter: read a power source, nothing else.

(Setting a GPU's power limit is control, not reading: `server.telemetry.power_limits`.)

One small interface (`PowerSource`) and its implementations: NVIDIA GPUs through NVML, CPU
packages through Linux RAPL (powercap), a replayed trace, and a null object for machines with
neither. Measurement windows and attribution live in `server.telemetry.energy_attribution`, which only calls `read()`.

Each source converts its vendor unit (mJ, mW, µJ) to joules and watts in one place, and
translates its vendor errors into `status = "unavailable"` plus a plain-language `reason` at
this boundary, so that callers never see `pynvml.NVMLError` or `OSError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "NvmlSource",
    "PowerSource",
    "RaplSource",
    "Reading",
    "SourceStatus",
    "SteadySource",
    "TraceSource",
    "UnavailableSource",
    "cuda_visible_devices",
    "detect_power_source",
]

logger = logging.getLogger(__name__)

SourceStatus = Literal["ok", "unavailable"]
DeviceId = int | str  # an NVML index, or a "GPU-..." UUID as CUDA_VISIBLE_DEVICES may name it

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
_MJ_PER_J = 1_000.0
_MW_PER_W = 1_000.0
_UJ_PER_J = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of a power source.

    `time_s` is monotonic seconds; `energy_j` a cumulative counter in joules (None when the
    device has no counter); `power_w` instant power in watts (None when unknown).
    """

    time_s: float
    energy_j: float | None
    power_w: float | None


class PowerSource(Protocol):
    """What the energy meter needs from hardware: a name, whether it works and why, a reading."""

    @property
    def name(self) -> str: ...

    @property
    def status(self) -> SourceStatus: ...

    @property
    def reason(self) -> str: ...

    def read(self) -> Reading: ...

    def close(self) -> None: ...


class UnavailableSource:
    """The null source: nothing to measure on this machine, and `reason` says why."""

    name = "unavailable"
    status: SourceStatus = "unavailable"

    def __init__(self, reason: str):
        self.reason = reason

    def read(self) -> Reading:
        return Reading(time.monotonic(), None, None)

    def close(self) -> None:
        pass


class SteadySource:
    """Constant `watts` on the real clock, for machines without a meter (tests, benchmarks).

    Its `read()` costs two clock reads, so it also isolates the sampler's own CPU cost.
    """

    status: SourceStatus = "ok"

    def __init__(self, watts: float, name: str = "steady-stand-in", reason: str | None = None):
        self.name = name
        self.reason = reason or f"constant {watts:g} W stand-in"
        self._watts = watts
        self._start_s = time.monotonic()

    def read(self) -> Reading:
        now_s = time.monotonic()
        return Reading(now_s, self._watts * (now_s - self._start_s), self._watts)

    def close(self) -> None:
        pass


class TraceSource:
    """Replays recorded (time_s, energy_j | None, power_w | None) samples, one per `read()`.

    For tests and offline replays. After the last sample it keeps returning the last one (zero
    elapsed time, which the meter ignores); `exhausted` says when that point has been reached.
    """

    status: SourceStatus = "ok"

    def __init__(self, samples: Sequence[tuple[float, float | None, float | None]], name: str = "trace"):
        if not samples:
            raise ValueError("a trace needs at least one sample")
        self.name = name
        self.reason = f"replaying {len(samples)} recorded samples"
        self._readings = [Reading(float(t), e, p) for t, e, p in samples]
        self._next = 0

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._readings)

    def read(self) -> Reading:
        index = min(self._next, len(self._readings) - 1)
        self._next += 1
        return self._readings[index]

    def close(self) -> None:
        pass


# --- NVML ---------------------------------------------------------------------------------


def cuda_visible_devices(value: str | None) -> list[DeviceId] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names: indices as ints, UUIDs as strings; None when unset.

    Like CUDA, parsing stops at the first entry that is neither (so "0,-1,2" means [0]).
    Caveat: CUDA numbers GPUs fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, while NVML
    numbers them by PCI bus, so on a box with mixed GPU models an index may name another card.
    """
    if value is None:
        return None
    devices: list[DeviceId] = []
    for entry in (part.strip() for part in value.split(",")):
        if entry.isdigit():
            devices.append(int(entry))
        elif entry.startswith("GPU-"):
            devices.append(entry)
        else:
            break
    return devices


def _nvml_reason(error: Exception) -> str:
    """Plain language for an NVML failure."""
    import pynvml

    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        return "NVML unavailable: no NVIDIA driver (libnvidia-ml.so not found)"
    if isinstance(error, pynvml.NVMLError_DriverNotLoaded):
        return "NVML unavailable: the NVIDIA kernel driver is not loaded"
    if isinstance(error, pynvml.NVMLError_NoPermission):
        return "NVML unavailable: no permission to query the GPU"
    return f"NVML unavailable: {error}"


def _field_value(field: Any) -> float:
    """The number inside an `nvmlFieldValue_t`, whatever its declared type."""
    import pynvml

    value = field.value
    return {
        pynvml.NVML_VALUE_TYPE_DOUBLE: value.dVal,
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: value.uiVal,
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: value.ulVal,
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: value.ullVal,
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: value.sllVal,
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: value.siVal,
        pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: value.usVal,
    }[field.valueType]


class NvmlSource:
    """NVIDIA GPUs via NVML, summed over the chosen devices.

    Energy comes from the cumulative counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ, Volta
    and newer); if any chosen device lacks it, `energy_j` is None and the meter integrates
    power instead. Power is the instant field (`NVML_FI_DEV_POWER_INSTANT`, mW); where a device
    lacks it, `nvmlDeviceGetPowerUsage` (mW, averaged over about a second on many boards) stands
    in, which is good for display but smooths short bursts if it has to be integrated.

    `devices`: NVML indices or "GPU-..." UUIDs; None means those in CUDA_VISIBLE_DEVICES when
    set, else every visible GPU. Never raises for a missing or broken NVML: it becomes
    `status = "unavailable"` with a `reason`, also if NVML fails later inside `read()`.
    """

    name = "nvml"

    def __init__(self, devices: Sequence[DeviceId] | None = None):
        self._status: SourceStatus = "unavailable"
        self._reason = "NVML not initialised"
        self._handles: list[Any] = []
        self._has_counter: list[bool] = []
        self._has_instant: list[bool] = []
        self._initialised = False
        try:
            import pynvml
        except ImportError:
            self._reason = "NVML unavailable: the nvidia-ml-py package is not installed"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._initialised = True
            chosen = self._choose(devices)
            if not chosen:
                self._fail("NVML found no GPU to measure (none visible, or CUDA_VISIBLE_DEVICES is empty)")
                return
            self._handles = [self._handle(device) for device in chosen]
            self._has_counter = [self._supports(pynvml.nvmlDeviceGetTotalEnergyConsumption, h) for h in self._handles]
            self._has_instant = [self._instant_mw(h) is not None for h in self._handles]
        except pynvml.NVMLError as error:
            self._fail(_nvml_reason(error))
            return
        self._status = "ok"
        counter = "energy counter" if all(self._has_counter) else "integrated power (no energy counter)"
        self._reason = f"NVML, {len(self._handles)} GPU(s) {list(chosen)}, {counter}"

    @property
    def status(self) -> SourceStatus:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def device_count(self) -> int:
        return len(self._handles)

    def read(self) -> Reading:
        """Sum the chosen GPUs now. An NVML error makes the source unavailable (logged once)."""
        now_s = time.monotonic()
        if self._status != "ok":
            return Reading(now_s, None, None)
        pynvml = self._nvml
        try:
            energy_mj: float | None = 0.0
            power_mw = 0.0
            gpus = zip(self._handles, self._has_counter, self._has_instant, strict=True)
            for handle, has_counter, has_instant in gpus:
                if has_counter and energy_mj is not None:
                    energy_mj += pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                else:
                    energy_mj = None
                instant_mw = self._instant_mw(handle) if has_instant else None
                power_mw += instant_mw if instant_mw is not None else pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError as error:
            self._status = "unavailable"
            self._reason = f"{_nvml_reason(error)} (failed while measuring)"
            logger.warning("energy: %s", self._reason)
            return Reading(now_s, None, None)
        return Reading(now_s, None if energy_mj is None else energy_mj / _MJ_PER_J, power_mw / _MW_PER_W)

    def close(self) -> None:
        """Shut NVML down (once); the source is unavailable afterwards."""
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        if self._status == "ok":
            self._status, self._reason = "unavailable", "NVML closed"

    def power_limit_w(self) -> float | None:
        """The enforced power limit, summed over the chosen GPUs, in W (None when unreadable)."""
        if self._status != "ok":
            return None
        try:
            return sum(self._nvml.nvmlDeviceGetEnforcedPowerLimit(h) for h in self._handles) / _MW_PER_W
        except self._nvml.NVMLError:
            return None

    @property
    def nvml_module(self) -> Any:
        """The `pynvml` module this source reads through (for `power_limits`, which also writes)."""
        return self._nvml

    @property
    def nvml_handles(self) -> tuple[Any, ...]:
        """The NVML handles of the chosen GPUs; empty unless the source is ok."""
        return tuple(self._handles) if self._status == "ok" else ()

    def _fail(self, reason: str) -> None:
        self._reason = reason
        self.close()
        self._status = "unavailable"

    def _choose(self, devices: Sequence[DeviceId] | None) -> list[DeviceId]:
        if devices is not None:
            return list(devices)
        from_env = cuda_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if from_env is not None:
            return from_env
        return list(range(self._nvml.nvmlDeviceGetCount()))

    def _handle(self, device: DeviceId) -> Any:
        if isinstance(device, int):
            return self._nvml.nvmlDeviceGetHandleByIndex(device)
        return self._nvml.nvmlDeviceGetHandleByUUID(device)

    def _supports(self, query: Any, handle: Any) -> bool:
        try:
            query(handle)
        except self._nvml.NVMLError_NotSupported:
            return False
        return True

    def _instant_mw(self, handle: Any) -> float | None:
        """Instant power in mW, or None where the driver or board does not offer the field."""
        pynvml = self._nvml
        try:
            (field,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        except pynvml.NVMLError:  # not supported, or too old a driver: fall back to averaged power
            return None
        if field.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        return float(_field_value(field))


# --- RAPL ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _RaplDomain:
    """One package domain: its files, the last raw value and the wraps seen so far (µJ)."""

    energy_file: Path
    max_range_uj: int
    last_raw_uj: int
    wrapped_uj: int = 0


class RaplSource:
    """CPU package energy from Linux powercap (`intel-rapl:N/energy_uj`), summed over packages.

    Only top-level package domains count (`name` starts with "package-"); sub-domains such as
    `intel-rapl:0:0` (core, uncore, dram) are parts of their package and would double count.
    The counter wraps at `max_energy_range_uj`; a value lower than the last one is taken as
    one wrap. No instant power: `power_w` is None. Since Linux 5.10 `energy_uj` is root-only,
    so an unprivileged gateway usually sees `status = "unavailable"` here.
    """

    name = "rapl"

    def __init__(self, root: Path = DEFAULT_POWERCAP_ROOT):
        self._root = root
        self._domains: list[_RaplDomain] = []
        self._status: SourceStatus = "unavailable"
        try:
            packages = self._package_dirs()
            if not packages:
                self._reason = f"no RAPL package domains under {root}"
                return
            for directory in packages:
                energy_file = directory / "energy_uj"
                self._domains.append(
                    _RaplDomain(
                        energy_file=energy_file,
                        max_range_uj=int((directory / "max_energy_range_uj").read_text()),
                        last_raw_uj=int(energy_file.read_text()),
                    )
                )
        except (OSError, ValueError) as error:
            self._domains = []
            self._reason = f"no readable RAPL counters under {root} ({_os_reason(error)})"
            return
        self._status = "ok"
        self._reason = f"RAPL, {len(self._domains)} CPU package(s) under {root}"

    @property
    def status(self) -> SourceStatus:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    def read(self) -> Reading:
        now_s = time.monotonic()
        if self._status != "ok":
            return Reading(now_s, None, None)
        total_uj = 0
        try:
            for domain in self._domains:
                raw_uj = int(domain.energy_file.read_text())
                if raw_uj < domain.last_raw_uj:
                    domain.wrapped_uj += domain.max_range_uj
                domain.last_raw_uj = raw_uj
                total_uj += domain.wrapped_uj + raw_uj
        except (OSError, ValueError) as error:
            self._status = "unavailable"
            self._reason = f"RAPL counters became unreadable ({_os_reason(error)})"
            logger.warning("energy: %s", self._reason)
            return Reading(now_s, None, None)
        return Reading(now_s, total_uj / _UJ_PER_J, None)

    def close(self) -> None:
        pass

    def _package_dirs(self) -> list[Path]:
        """`intel-rapl:N` directories (not `intel-rapl:N:M`) whose name is `package-*`."""
        if not self._root.is_dir():
            raise FileNotFoundError(f"{self._root} does not exist")
        found = []
        for directory in sorted(self._root.glob("intel-rapl:*")):
            if directory.name.count(":") != 1:
                continue
            if (directory / "name").read_text().strip().startswith("package-"):
                found.append(directory)
        return found


def _os_reason(error: Exception) -> str:
    if isinstance(error, PermissionError):
        return f"permission denied reading {error.filename}; RAPL is root-only since Linux 5.10"
    if isinstance(error, FileNotFoundError) and error.filename is None:
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror or error}: {error.filename}"
    return f"unexpected contents: {error}"


# --- choosing one -------------------------------------------------------------------------


def detect_power_source(
    prefer: Literal["auto", "nvml", "rapl", "none"] = "auto",
    *,
    nvml_devices: Sequence[DeviceId] | None = None,
    rapl_root: Path = DEFAULT_POWERCAP_ROOT,
) -> PowerSource:
    """The best working source: NVML when it starts and sees a GPU, else RAPL, else the null one.

    `prefer` narrows the choice ("none" turns measuring off). The unavailable result's reason
    names everything that was tried and why each failed.
    """
    if prefer == "none":
        return UnavailableSource("energy measurement turned off (power source: none)")
    reasons = []
    if prefer in ("auto", "nvml"):
        nvml = NvmlSource(nvml_devices)
        if nvml.status == "ok":
            return nvml
        reasons.append(nvml.reason)
    if prefer in ("auto", "rapl"):
        rapl = RaplSource(rapl_root)
        if rapl.status == "ok":
            return rapl
        reasons.append(rapl.reason)
    return UnavailableSource("; ".join(reasons))
