"""Energy from a DCGM exporter: parsing the exporter's text, choosing GPUs, counters that reset,
scrapes that fail, power-only cards, and what the meter makes of it all.

The text is the fixtures' (`data/`, written to dcgm-exporter's exact format: see its README), with
only the energy and power values changed per scrape.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Iterator

import pytest

import server.telemetry.dcgm_source
from server.telemetry.dcgm_source import (
    DcgmExporterSource,
    ExporterTarget,
    GpuSample,
    exporter_url,
    parse_dcgm_metrics,
    parse_exporter_spec,
)
from server.telemetry.energy_attribution import EnergyMeter
from tests.server.telemetry.fake_dcgm_exporter import (
    POWER_ONLY_P40,
    FakeDcgmExporter,
    recorded,
    with_values,
)

H100 = recorded()
P40 = recorded(POWER_ONLY_P40)
UUID_0 = "GPU-3f9c2b7e-81d4-5a6c-9e0b-7d2a4c6f1e58"
UUID_1 = "GPU-a04e5d19-6c37-2f8b-b1d9-0e8c3a5f7b22"
URL = "http://gpu-node-2:9400/metrics"


class Scripted:
    """A fetch that answers each scrape with the next text, or raises the next exception."""

    def __init__(self, *answers: str | Exception):
        self._answers: Iterator[str | Exception] = iter(answers)

    def __call__(self, url: str, timeout_s: float) -> str:
        answer = next(self._answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        self.now_s += 1.0  # one second per scrape
        return self.now_s


def source(*answers: str | Exception, gpus: tuple[str, ...] = (), **options: object) -> DcgmExporterSource:
    return DcgmExporterSource(ExporterTarget(URL, gpus), fetch=Scripted(*answers), clock=Clock(), **options)


def scrape(gpu0_mj: int, gpu1_mj: int, gpu0_w: float = 312.457, gpu1_w: float = 69.328) -> str:
    return with_values(H100, {"0": gpu0_mj, "1": gpu1_mj}, {"0": gpu0_w, "1": gpu1_w})


def test_public_surface_is_exactly_all() -> None:
    assert set(server.telemetry.dcgm_source.__all__) == {
        "DEFAULT_INTERVAL_S", "ENERGY_METRIC", "POWER_METRIC", "DcgmExporterSource", "ExporterTarget", "GpuSample",
        "exporter_url", "parse_dcgm_metrics", "parse_exporter_spec",
    }  # fmt: skip


# --- parsing ---------------------------------------------------------------------------------


def test_the_recorded_text_parses_to_both_gpus_with_energy_in_mj_and_power_in_w() -> None:
    assert parse_dcgm_metrics(H100) == {
        "0": GpuSample("0", UUID_0, 48213567212.0, 312.457),
        "1": GpuSample("1", UUID_1, 31877436598.0, 69.328),
    }


def test_a_power_only_card_has_no_energy() -> None:
    assert parse_dcgm_metrics(P40) == {"0": GpuSample("0", "GPU-5d7e0c3a-2b91-4f46-8a3d-c61e9f04b7a5", None, 118.904)}


def test_series_repeated_per_mig_instance_count_once_with_the_largest_counter() -> None:
    line = next(line for line in H100.splitlines() if line.startswith('DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"'))
    labels, value = line.rsplit(" ", 1)
    model = 'modelName="NVIDIA H100 80GB HBM3"'
    instances = [
        labels.replace(model, f'{model},GPU_I_PROFILE="3g.40gb",GPU_I_ID="{gi}"') + f" {int(value) + extra}"
        for gi, extra in ((1, 0), (2, 5664), (3, 0))
    ]
    text = H100.replace(line, "\n".join(instances))
    assert parse_dcgm_metrics(text)["0"].energy_mj == int(value) + 5664


def test_dcgm_blank_values_are_missing_not_numbers() -> None:
    text = with_values(H100, {"0": 9223372036854775794})  # DCGM_INT64_NOT_SUPPORTED, as old exporters print it
    assert parse_dcgm_metrics(text)["0"].energy_mj is None


@pytest.mark.parametrize(
    "text", ["<html><body><h1>404 Not Found</h1></body></html>", 'DCGM_FI_DEV_POWER_USAGE{gpu="0" 1', "a b c"]
)
def test_text_that_is_not_prometheus_metrics_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dcgm_metrics(text)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "replica", "target"),
    [
        ("http://gpu1:8001=http://gpu1:9400", "http://gpu1:8001", ExporterTarget("http://gpu1:9400/metrics")),
        ("http://gpu1:8001/v1=http://gpu1:9400/metrics#0,1", "http://gpu1:8001",
         ExporterTarget("http://gpu1:9400/metrics", ("0", "1"))),
        (f"https://a.example/=https://a.example/dcgm/metrics#{UUID_1}", "https://a.example",
         ExporterTarget("https://a.example/dcgm/metrics", (UUID_1,))),
    ],
)  # fmt: skip
def test_an_exporter_spec_names_a_replica_an_exporter_and_gpus(spec: str, replica: str, target: ExporterTarget) -> None:
    assert parse_exporter_spec(spec) == (replica, target)
    assert exporter_url(str(target).partition("#")[0]) == target.url


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("http://gpu1:8001", "REPLICA_URL=EXPORTER_URL"),
        ("http://gpu1:8001=gpu1:9400", "http://host:9400/metrics"),
        ("gpu1:8001=http://gpu1:9400", "replica must look like"),
        ("http://gpu1:8001=http://gpu1:9400#first", "gpu index"),
        ("http://gpu1:8001=http://gpu1:9400#", "must be followed by GPU"),
    ],
)
def test_a_bad_exporter_spec_says_what_is_expected(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_exporter_spec(spec)


# --- reading ---------------------------------------------------------------------------------


def test_two_gpus_are_summed_in_joules_and_watts() -> None:
    dcgm = source(H100)
    reading = dcgm.read()
    assert reading.energy_j == pytest.approx((48213567212 + 31877436598) / 1000)
    assert reading.power_w == pytest.approx(312.457 + 69.328)
    assert dcgm.status == "ok"
    assert dcgm.reason == f"DCGM exporter {URL}, GPU 0, 1, energy counters"


@pytest.mark.parametrize("selector", ["1", UUID_1])
def test_a_gpu_is_chosen_by_index_or_uuid(selector: str) -> None:
    reading = source(H100, gpus=(selector,)).read()
    assert (reading.energy_j, reading.power_w) == (pytest.approx(31877436.598), pytest.approx(69.328))


def test_a_gpu_the_exporter_does_not_list_is_unavailable_with_the_reason() -> None:
    dcgm = source(H100, H100, gpus=("0", "3"))
    reading = dcgm.read()
    assert (reading.energy_j, reading.power_w) == (None, None)
    assert dcgm.status == "unavailable"
    assert dcgm.reason == f"DCGM exporter {URL} does not list GPU 3; it lists GPU 0 ({UUID_0}), 1 ({UUID_1})"
    dcgm.read()
    assert dcgm.status == "unavailable"  # every read tries again, and says the same


def test_a_counter_that_goes_down_is_a_new_baseline_for_that_gpu_only(caplog: pytest.LogCaptureFixture) -> None:
    dcgm = source(scrape(1_000_000, 5_000_000), scrape(1_400_000, 5_100_000), scrape(30_000, 5_200_000),
                  scrape(330_000, 5_300_000))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="server.telemetry.dcgm_source"):
        energies = [dcgm.read().energy_j for _ in range(4)]
    # GPU 0's driver reloaded between the 2nd and 3rd scrapes: its 30 J since then count, nothing is lost twice.
    assert energies == pytest.approx([6000.0, 6500.0, 6500.0 + 30.0 + 100.0, 6500.0 + 330.0 + 200.0])
    assert dcgm.resets == 1
    assert any("GPU 0's energy counter went down" in record.message for record in caplog.records)

    meter = EnergyMeter(source(scrape(1_000_000, 5_000_000), scrape(1_400_000, 5_100_000), scrape(30_000, 5_200_000)),
                        idle_w=0.0)  # fmt: skip
    for _ in range(3):
        meter.tick(meter.source.read())
    assert meter.snapshot().total_j == pytest.approx(500.0 + 130.0)  # never a negative interval


def test_an_unchanged_scrape_is_the_same_reading_and_a_frozen_counter_becomes_unavailable() -> None:
    dcgm = source(H100, H100, H100, H100, H100, scrape(48213567212 + 1000, 31877436598), stale_after_s=1.5)
    first, second = dcgm.read(), dcgm.read()
    assert second is first  # the exporter has not updated: the meter ignores a reading no later than the last
    third = dcgm.read()  # 2 s later, still the same counters
    assert (third.energy_j, dcgm.status) == (None, "ok")  # a gap; unavailable only if it lasts
    assert "have not changed for 2 s" in dcgm.reason
    dcgm.read(), dcgm.read()
    assert dcgm.status == "unavailable" and "have not changed for 4 s (is DCGM's host engine stuck?)" in dcgm.reason
    assert dcgm.read().energy_j == pytest.approx((48213567212 + 1000 + 31877436598) / 1000)  # moving again
    assert dcgm.status == "ok"


def test_a_failed_scrape_is_a_gap_not_zero_joules_and_the_meter_skips_it() -> None:
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    dcgm = source(scrape(0, 0, 100.0, 0.0), scrape(100_000, 0, 100.0, 0.0), refused,
                  scrape(300_000, 0, 100.0, 0.0), scrape(400_000, 0, 100.0, 0.0))  # fmt: skip
    meter = EnergyMeter(dcgm, idle_w=0.0)
    meter.start_request("a")
    readings = []
    for _ in range(5):
        readings.append(dcgm.read())
        meter.add_tokens("a", 10)
        meter.tick(readings[-1])
        if len(readings) == 3:
            assert dcgm.status == "ok"  # one failed scrape is a gap, not an outage
            assert "unreachable: connection refused" in dcgm.reason
    assert (readings[2].energy_j, readings[2].power_w) == (None, None)
    snap = meter.snapshot()
    assert (snap.gaps, snap.intervals) == (2, 4)  # the intervals on both sides of the failed scrape
    assert snap.total_j == pytest.approx(100.0 + 100.0)  # the 200 J across the gap are not counted, nor 0 J
    assert meter.finish_request("a") is None  # its energy is not known in full
    assert snap.total_j == pytest.approx(snap.idle_j + snap.attributed_j + snap.unattributed_j)
    assert meter.snapshot().attributed_j == 0.0  # what it was given moved to unattributed: still conserved
    assert meter.snapshot().unattributed_j == pytest.approx(200.0)


def test_an_exporter_that_stays_down_is_unavailable_with_the_reason_and_comes_back() -> None:
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    dcgm = source(scrape(0, 0), refused, refused, refused, scrape(500_000, 0), failures_to_unavailable=3)
    meter = EnergyMeter(dcgm, idle_w=0.0)
    meter.tick(dcgm.read())
    for _ in range(3):
        meter.tick(dcgm.read())
    assert dcgm.status == "unavailable"
    assert dcgm.reason == (
        f"DCGM exporter {URL} unreachable: connection refused: is the exporter running, and is its port open?"
    )
    snap = meter.snapshot()
    assert (snap.status, snap.total_j) == ("unavailable", None)
    assert meter.tracking  # still sampled: it may come back
    meter.start_request("b")  # requests are followed while it is down
    meter.tick(dcgm.read())
    assert dcgm.status == "ok" and meter.snapshot().total_j == 0.0  # back; the reading after a gap is a baseline
    assert meter.finish_request("b") is None


def test_power_only_cards_integrate_power() -> None:
    dcgm = source(with_values(P40, power_w={"0": 100.0}), with_values(P40, power_w={"0": 200.0}),
                  with_values(P40, power_w={"0": 200.0}), with_values(P40, power_w={"0": 150.0}))  # fmt: skip
    meter = EnergyMeter(dcgm, idle_w=0.0)
    for _ in range(4):
        reading = dcgm.read()
        assert reading.energy_j is None
        meter.tick(reading)
    assert dcgm.reason.endswith("integrated power (no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)")
    # 1 s at (100 + 200) / 2 W, then 2 s at (200 + 150) / 2 W: the repeated 200 W scrape is the same reading.
    assert meter.snapshot().total_j == pytest.approx(150.0 + 350.0)


def test_a_gpu_with_a_counter_beside_one_without_falls_back_to_power() -> None:
    mixed = H100.replace('DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1"', 'DCGM_FI_DEV_OTHER{gpu="1"')
    reading = source(mixed).read()
    assert (reading.energy_j, reading.power_w) == (None, pytest.approx(312.457 + 69.328))


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("<html><body>It works!</body></html>", "is not Prometheus metrics (invalid metric name"),
        ("# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.21\n",
         "lists no GPU with DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION or DCGM_FI_DEV_POWER_USAGE"),
        (urllib.error.HTTPError(URL, 404, "Not Found", None, None), "unreachable: it answered HTTP 404"),
        (TimeoutError("timed out"), "unreachable: no answer within 2 s"),
        (urllib.error.URLError(OSError(-2, "Name or service not known")), "unreachable: Name or service not known"),
    ],
)  # fmt: skip
def test_each_failure_has_a_plain_reason_and_never_raises(answer: str | Exception, reason: str) -> None:
    dcgm = source(answer)
    reading = dcgm.read()
    assert (reading.energy_j, reading.power_w) == (None, None)
    assert dcgm.status == "unavailable" and reason in dcgm.reason


def test_a_closed_source_reads_nothing() -> None:
    dcgm = source(H100)
    dcgm.close()
    assert dcgm.read().energy_j is None and dcgm.status == "unavailable" and dcgm.reason.endswith("closed")


# --- over real HTTP --------------------------------------------------------------------------


def test_the_exporter_over_http_then_stopped() -> None:
    exporter = FakeDcgmExporter(watts={"0": 300.0, "1": 70.0}).start()
    try:
        dcgm = DcgmExporterSource(ExporterTarget(exporter.url, ("0",)), failures_to_unavailable=1)
        first = dcgm.read()
        assert dcgm.status == "ok" and first.power_w == pytest.approx(300.0)
        assert first.energy_j == pytest.approx(48213567.212, abs=300.0 * 5)
        wrong = DcgmExporterSource(ExporterTarget(exporter.url.replace("/metrics", "/nothing-here")))
        wrong.read()
        assert wrong.reason.endswith("unreachable: it answered HTTP 404")
    finally:
        exporter.stop()
    assert dcgm.read().energy_j is None
    assert dcgm.status == "unavailable" and "connection refused" in dcgm.reason
