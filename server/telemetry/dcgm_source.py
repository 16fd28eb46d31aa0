"""Energy of GPUs on another host, read from NVIDIA's DCGM exporter (dcgm-exporter) over HTTP.

A replica on another machine cannot be measured through this host's NVML. Its host usually runs
NVIDIA's dcgm-exporter already (the GPU Operator installs it); `DcgmExporterSource` reads that
exporter's Prometheus text instead of running anything of ours there:

* `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (counter, mJ since the driver loaded) per GPU, summed
  over the chosen GPUs, is the energy; a GPU whose counter goes down (a driver reload) starts a
  new baseline for that GPU only, so the sum never goes backwards.
* `DCGM_FI_DEV_POWER_USAGE` (gauge, W) is the power, and the energy's stand-in when a chosen GPU
  has no counter (the meter then integrates power).

GPUs are chosen by the exporter's `gpu` label (its index on that host) or its `UUID` label. The
exporter refreshes its values every `--collect-interval` (30 s by default, set 1 s for
per-request figures); a scrape that finds the same values as the one before returns the same
reading again, which the meter ignores, so an interval spans two real updates.

`read()` does an HTTP GET (urllib, short timeout), so only the meter's sampler thread calls it
(`networked = True` tells the meter). It never raises: an unreachable exporter, an HTTP error,
text that is not Prometheus metrics, a chosen GPU the exporter does not list, a counter frozen
for minutes each become a reading with no energy and no power (a gap, never 0 J) and a
plain-language `reason`. After `failures_to_unavailable` failed reads in a row (or at once when
nothing was ever read) the status is "unavailable"; the next good read makes it "ok" again.
"""

from __future__ import annotations

import http.client
import logging
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

from server.telemetry.power_sources import Reading, SourceStatus

__all__ = [
    "DEFAULT_INTERVAL_S",
    "ENERGY_METRIC",
    "POWER_METRIC",
    "DcgmExporterSource",
    "ExporterTarget",
    "GpuSample",
    "exporter_url",
    "parse_dcgm_metrics",
    "parse_exporter_spec",
]

logger = logging.getLogger(__name__)

ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # counter, mJ since the driver loaded
POWER_METRIC = "DCGM_FI_DEV_POWER_USAGE"  # gauge, W
DEFAULT_INTERVAL_S = 1.0  # how often the meter reads an exporter
DEFAULT_TIMEOUT_S = 2.0  # a busy gateway's sampler thread may wait for the interpreter too
DEFAULT_FAILURES_TO_UNAVAILABLE = 3
DEFAULT_STALE_AFTER_S = 180.0  # six of the exporter's default 30 s updates
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_MJ_PER_J = 1_000.0
_UUID_LABELS = ("UUID", "uuid")  # dcgm-exporter's default, and its old-namespace spelling
# DCGM's "blank" values (not supported, not found, ...): older exporters print them instead of omitting the line.
_INT64_BLANK = float(0x7FFFFFFFFFFFFFF0)
_FP64_BLANK = 140737488355328.0

Fetch = Callable[[str, float], str]  # (url, timeout in s) -> the response body; raises on any failure


@dataclass(frozen=True, slots=True)
class ExporterTarget:
    """Where a replica's energy is read: the exporter's metrics URL and the GPUs to sum.

    `gpus`: the exporter's `gpu` label values ("0", "1") or "GPU-..." UUIDs; empty means every
    GPU the exporter lists.
    """

    url: str
    gpus: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.url + (f"#{','.join(self.gpus)}" if self.gpus else "")


def exporter_url(text: str) -> str:
    """An exporter's metrics URL: http(s)://host:port, with `/metrics` when no path is given."""
    text = text.strip()
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"DCGM exporter URL must look like http://host:9400/metrics, got {text!r}")
    return text if parsed.path not in ("", "/") else text.rstrip("/") + "/metrics"


def _gpu_selector(text: str) -> str:
    selector = text.strip()
    if selector.isdigit() or (selector.startswith("GPU-") and len(selector) > 4):
        return selector
    raise ValueError(f"GPU {selector!r}: expected the exporter's gpu index (0, 1, ...) or a GPU-... UUID")


def parse_exporter_spec(text: str) -> tuple[str, ExporterTarget]:
    """`REPLICA=EXPORTER[#GPU[,GPU...]]` → (replica root URL, where its energy is read).

    REPLICA is a vLLM base URL as `--upstream` takes it; EXPORTER the DCGM exporter on that
    replica's host; GPU an index as the exporter's `gpu` label shows it, or a GPU-... UUID.
    """
    replica, sep, rest = text.strip().partition("=")
    if not sep or not replica.strip() or not rest.strip():
        raise ValueError(f"energy exporter {text!r}: expected REPLICA_URL=EXPORTER_URL[#GPU,...]")
    url, hash_sign, gpus = rest.partition("#")
    selectors = tuple(_gpu_selector(gpu) for gpu in gpus.split(",") if gpu.strip())
    if hash_sign and not selectors:
        raise ValueError(f"energy exporter {text!r}: '#' must be followed by GPU indices or UUIDs")
    root = replica.strip().rstrip("/").removesuffix("/v1")
    parsed = urlparse(root)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"energy exporter {text!r}: the replica must look like http://host:port, got {replica!r}")
    return root, ExporterTarget(exporter_url(url), selectors)


# --- the exposition format ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU in one scrape: its `gpu` label, UUID, energy counter (mJ) and power (W); a
    figure the exporter did not give (or gave as DCGM's "blank") is None."""

    index: str
    uuid: str | None
    energy_mj: float | None
    power_w: float | None


def _value(value: float, blank: float) -> float | None:
    number = float(value)  # (the parser gives ints for integer text)
    return None if math.isnan(number) or number >= blank or number < 0 else number


def parse_dcgm_metrics(text: str) -> dict[str, GpuSample]:
    """The GPUs in dcgm-exporter's text, by their `gpu` label, with energy and power.

    Parsed with prometheus-client's parser; raises ValueError for text that is not the Prometheus
    exposition format. A GPU listed several times (one series per MIG instance, or per pod)
    repeats the device-wide figures, read at slightly different moments: the largest counter
    counts (so the sum never jitters backwards), and the first power. GPUs with neither metric
    are not in the result.
    """
    energy: dict[str, float | None] = {}
    power: dict[str, float | None] = {}
    uuids: dict[str, str | None] = {}
    wanted = {ENERGY_METRIC: (energy, _INT64_BLANK), POWER_METRIC: (power, _FP64_BLANK)}
    try:
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            values, blank = wanted[family.name]
            for sample in family.samples:
                if sample.name not in (family.name, family.name + "_total"):  # counters read as `_total`
                    continue
                index = sample.labels.get("gpu")
                if index is None:
                    continue
                value = _value(sample.value, blank)
                if index in values:
                    earlier = values[index]
                    if family.name == ENERGY_METRIC and earlier is not None and value is not None:
                        values[index] = max(earlier, value)
                    continue
                values[index] = value
                uuid = next((sample.labels[label] for label in _UUID_LABELS if label in sample.labels), None)
                uuids.setdefault(index, uuid)
    except ValueError:
        raise
    except Exception as error:  # the parser's other complaints about odd text are the same problem
        raise ValueError(f"{type(error).__name__}: {error}") from None
    return {
        index: GpuSample(index, uuids.get(index), energy.get(index), power.get(index))
        for index in sorted({*energy, *power}, key=_gpu_order)
    }


def _gpu_order(index: str) -> tuple[int, str]:
    return (int(index), "") if index.isdigit() else (1 << 30, index)


# --- the source ----------------------------------------------------------------------------


def _http_get(url: str, timeout_s: float) -> str:
    """GET `url` (no proxy from the environment, as the upstream client) and return its text."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with opener.open(request, timeout=timeout_s) as response:
        body = response.read(MAX_RESPONSE_BYTES + 1)
    if len(body) > MAX_RESPONSE_BYTES:
        raise ValueError(f"the answer is larger than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB")
    return body.decode("utf-8", errors="replace")


def _fetch_reason(error: Exception, timeout_s: float) -> str:
    """Plain language for a failed GET."""
    if isinstance(error, urllib.error.HTTPError):
        return f"it answered HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, Exception) else OSError(str(error.reason))
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: is the exporter running, and is its port open?"
    if isinstance(error, socket.gaierror):
        return f"host not found ({error.strerror or error})"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    if isinstance(error, http.client.HTTPException):
        return f"broken HTTP answer ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


class DcgmExporterSource:
    """The GPUs of one replica's host, read from its DCGM exporter (see the module docstring).

    `fetch` replaces the HTTP GET (tests serve text through it); `clock` the monotonic clock.
    """

    name = "dcgm"
    networked = True  # read over the network: only from the sampler thread, and it may come back

    def __init__(
        self,
        target: ExporterTarget,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        failures_to_unavailable: int = DEFAULT_FAILURES_TO_UNAVAILABLE,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if timeout_s <= 0 or failures_to_unavailable < 1 or stale_after_s <= 0:
            raise ValueError("timeout_s and stale_after_s must be > 0, failures_to_unavailable >= 1")
        self.target = target
        self._where = f"DCGM exporter {target.url}"
        self._timeout_s = timeout_s
        self._failures_to_unavailable = failures_to_unavailable
        self._stale_after_s = stale_after_s
        self._fetch = fetch or _http_get
        self._clock = clock
        self._status: SourceStatus = "unavailable"
        self._reason = f"{self._where}: not read yet"
        self._failures = 0
        self._closed = False
        self.resets = 0  # counter decreases seen (driver reloads), over all chosen GPUs
        self._raw_mj: dict[str, float] = {}  # per GPU: the counter's last value
        self._base_mj: dict[str, float] = {}  # per GPU: what earlier driver loads counted
        self._values: tuple[object, ...] | None = None  # the last scrape's figures, to spot repeats
        self._changed_s = 0.0  # when the counters last moved
        self._reading: Reading | None = None

    @property
    def status(self) -> SourceStatus:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    def read(self) -> Reading:
        """Scrape the exporter once: the chosen GPUs' summed counter (J) and power (W), or a gap."""
        if self._closed:
            return Reading(self._clock(), None, None)
        try:
            text = self._fetch(self.target.url, self._timeout_s)
        except Exception as error:  # whatever the network or urllib raised: one plain reason
            return self._failed(f"{self._where} unreachable: {_fetch_reason(error, self._timeout_s)}")
        now_s = self._clock()
        try:
            gpus = parse_dcgm_metrics(text)
        except ValueError as error:
            return self._failed(f"{self._where} sent something that is not Prometheus metrics ({error})", now_s)
        if not gpus:
            return self._failed(
                f"{self._where} lists no GPU with {ENERGY_METRIC} or {POWER_METRIC}: is it a DCGM exporter, "
                "and are both in its counters CSV?",
                now_s,
            )
        try:
            chosen = self._choose(gpus)
        except LookupError as error:
            return self._failed(str(error.args[0]), now_s)
        return self._measured(chosen, now_s)

    def close(self) -> None:
        """Stop reading; the source is unavailable afterwards (there is no connection to close)."""
        self._closed = True
        self._status, self._reason = "unavailable", f"{self._where}: closed"

    # --- internals --------------------------------------------------------------------------

    def _choose(self, gpus: Mapping[str, GpuSample]) -> list[GpuSample]:
        if not self.target.gpus:
            return list(gpus.values())
        by_uuid = {gpu.uuid: gpu for gpu in gpus.values() if gpu.uuid}
        chosen, missing = [], []
        for selector in self.target.gpus:
            gpu = gpus.get(selector) if selector.isdigit() else by_uuid.get(selector)
            if gpu is None:
                missing.append(selector)
            else:
                chosen.append(gpu)
        if missing:
            listed = ", ".join(f"{gpu.index} ({gpu.uuid})" if gpu.uuid else gpu.index for gpu in gpus.values())
            raise LookupError(f"{self._where} does not list GPU {', '.join(missing)}; it lists GPU {listed}")
        return chosen

    def _measured(self, chosen: Sequence[GpuSample], now_s: float) -> Reading:
        unmeasured = [gpu.index for gpu in chosen if gpu.energy_mj is None and gpu.power_w is None]
        if unmeasured:
            return self._failed(f"{self._where} gives neither energy nor power for GPU {', '.join(unmeasured)}", now_s)
        counters = all(gpu.energy_mj is not None for gpu in chosen)
        values = tuple((gpu.index, gpu.energy_mj, gpu.power_w) for gpu in chosen)
        if values == self._values:  # the exporter has not updated since
            if counters and now_s - self._changed_s > self._stale_after_s:
                return self._failed(
                    f"{self._where}: the energy counters have not changed for {now_s - self._changed_s:.0f} s "
                    "(is DCGM's host engine stuck?)",
                    now_s,
                    keep_values=True,
                )
            if self._reading is not None:
                return self._reading
        self._values, self._changed_s = values, now_s
        energy_j = self._total_mj(chosen) / _MJ_PER_J if counters else None
        powers = [gpu.power_w for gpu in chosen]
        power_w = None if None in powers else sum(p for p in powers if p is not None)
        self._succeeded(chosen, counters)
        self._reading = Reading(now_s, energy_j, power_w)
        return self._reading

    def _total_mj(self, chosen: Sequence[GpuSample]) -> float:
        """The chosen GPUs' counters summed, each continued across its own resets (mJ)."""
        total_mj = 0.0
        for gpu in chosen:
            key = gpu.uuid or gpu.index
            raw_mj = gpu.energy_mj or 0.0
            last_mj = self._raw_mj.get(key)
            if last_mj is not None and raw_mj < last_mj:
                self.resets += 1
                self._base_mj[key] = self._base_mj.get(key, 0.0) + last_mj
                logger.warning(
                    "energy: %s: GPU %s's energy counter went down (%.0f -> %.0f mJ; driver reloaded?); "
                    "counting on from the new value",
                    self._where, gpu.index, last_mj, raw_mj,
                )  # fmt: skip
            self._raw_mj[key] = raw_mj
            total_mj += self._base_mj.get(key, 0.0) + raw_mj
        return total_mj

    def _succeeded(self, chosen: Sequence[GpuSample], counters: bool) -> None:
        if self._status != "ok" and self._failures:
            logger.info("energy: %s answers again", self._where)
        self._failures = 0
        self._status = "ok"
        how = "energy counters" if counters else f"integrated power (no {ENERGY_METRIC})"
        self._reason = f"{self._where}, GPU {', '.join(gpu.index for gpu in chosen)}, {how}"

    def _failed(self, reason: str, now_s: float | None = None, keep_values: bool = False) -> Reading:
        """A read that measured nothing: a gap now; unavailable once it keeps happening.

        `keep_values`: the counters are frozen; remember them, so that only a change counts as
        the exporter working again.
        """
        self._failures += 1
        self._reading = None
        if not keep_values:
            self._values = None
        if self._status == "ok" and self._failures < self._failures_to_unavailable:
            self._reason = f"{reason} ({self._failures} failed read(s) in a row: a gap in the measurement)"
            logger.info("energy: %s", self._reason)
        else:
            if self._status == "ok" or reason != self._reason:
                logger.warning("energy: %s", reason)
            self._status, self._reason = "unavailable", reason
        return Reading(self._clock() if now_s is None else now_s, None, None)
