"""GPU power limits for `student serve --power-limit-w`: cap at start, put back at exit (NVML).

Control, not measurement: the power sources only read. A limit needs root (NVML's own rule)
and a value inside each board's range. It is applied to the GPUs the energy meter reads, once
at start-up, and the previous limits are restored when the gateway stops.

Nothing here stops the gateway: a limit that cannot be applied is a loud warning (the gateway
serves and measures anyway, and /stats shows the limit actually enforced), and a restore that
fails is a warning too, so the rest of the shutdown (closing NVML, the ledger) still happens.
NVML's errors are turned into `PowerLimitError` here, the undo of a half-applied limit included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from server.telemetry.power_sources import PowerSource

logger = logging.getLogger(__name__)

_MW_PER_W = 1_000.0


class PowerLimitError(Exception):
    """A GPU power limit could not be applied or restored; the message says why in plain words."""


class NvmlPowerLimits:
    """Set and restore the power limit of some GPUs through NVML (`nvml`: the pynvml module)."""

    def __init__(self, nvml: Any, handles: Sequence[Any]) -> None:
        self._nvml = nvml
        self._handles = tuple(handles)

    @classmethod
    def for_source(cls, source: PowerSource) -> NvmlPowerLimits | None:
        """The limits of the GPUs `source` reads; None when it reads no GPU through NVML."""
        handles = getattr(source, "nvml_handles", ())
        if not handles:
            return None
        return cls(source.nvml_module, handles)  # type: ignore[attr-defined]  # an NVML source

    def set(self, watts_per_gpu: float) -> list[float]:
        """Cap every GPU at `watts_per_gpu`; returns the previous limits (W) to restore.

        Raises `PowerLimitError` with the reason, leaving every GPU as it was when it can.
        """
        nvml = self._nvml
        try:
            previous_mw = [nvml.nvmlDeviceGetPowerManagementLimit(handle) for handle in self._handles]
            for handle in self._handles:
                low_mw, high_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
                if not low_mw <= watts_per_gpu * _MW_PER_W <= high_mw:
                    raise PowerLimitError(
                        f"{watts_per_gpu:.0f} W is outside this GPU's range "
                        f"{low_mw / _MW_PER_W:.0f}–{high_mw / _MW_PER_W:.0f} W"
                    )
        except nvml.NVMLError as error:
            raise PowerLimitError(f"cannot read the power limits: {error}") from None
        self._set_mw([int(watts_per_gpu * _MW_PER_W)] * len(self._handles), undo_mw=previous_mw)
        return [mw / _MW_PER_W for mw in previous_mw]

    def restore(self, limits_w: Sequence[float]) -> None:
        """Put back the limits `set` returned; `PowerLimitError` when NVML refuses."""
        self._set_mw([int(watts * _MW_PER_W) for watts in limits_w], undo_mw=None)

    def _set_mw(self, limits_mw: Sequence[int], undo_mw: Sequence[int] | None) -> None:
        nvml = self._nvml
        done: list[Any] = []
        try:
            for handle, limit_mw in zip(self._handles, limits_mw, strict=True):
                nvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
                done.append(handle)
        except nvml.NVMLError as error:
            why = "run as root" if isinstance(error, nvml.NVMLError_NoPermission) else str(error)
            raise PowerLimitError(f"cannot set the power limit: {why}{self._undo(done, undo_mw)}") from None

    def _undo(self, done: Sequence[Any], undo_mw: Sequence[int] | None) -> str:
        """Put the GPUs already changed back; what could not be undone, for the error message."""
        if undo_mw is None:
            return ""
        failed = []
        for index, (handle, limit_mw) in enumerate(zip(done, undo_mw, strict=False)):
            try:
                self._nvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
            except self._nvml.NVMLError as error:
                failed.append(f"GPU {index} left at the new limit ({error})")
        return "; and " + "; ".join(failed) if failed else ""


def apply_power_limit(watts: float | None, source: PowerSource) -> Callable[[], None]:
    """Cap the GPUs `source` reads at `watts` (if asked); returns how to put the old limits back.

    Neither this nor the returned function raises: a failure is logged as a warning.
    """
    if watts is None:
        return lambda: None
    limits = NvmlPowerLimits.for_source(source)
    if limits is None:
        logger.warning("power limit %.0f W not applied: it needs NVML (%s)", watts, source.reason)
        return lambda: None
    try:
        previous_w = limits.set(watts)
    except PowerLimitError as error:
        logger.warning("power limit %.0f W not applied: %s", watts, error)
        return lambda: None
    logger.info("power limit %.0f W per GPU applied (was %s W)", watts, previous_w)

    def restore() -> None:
        try:
            limits.restore(previous_w)
        except PowerLimitError as error:
            logger.warning("power limits not restored to %s W: %s", previous_w, error)

    return restore
