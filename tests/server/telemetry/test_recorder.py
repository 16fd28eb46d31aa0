"""Accounting end to end on the real stack: the client's counts == /stats == /metrics == the ledger.

Also: the ledger keeps every finished request through a SIGKILL of the gateway, and with a power
source that measures (a steady stand-in: this machine has no GPU and no RAPL) every request gets
energy, and the energy adds up. And a replica on "another host" measured through that host's
DCGM exporter (a stand-in serving the recorded exporter text over HTTP): its energy is measured,
conserved and in the ledger with the replica, and "unavailable" with the reason once the exporter
stops, while requests go on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from server.accounting.ledger import Ledger, daily_summary, read_energy, read_requests
from server.gateway.app import create_app
from server.runtime.settings import Settings
from server.telemetry.energy_attribution import LOCAL_METER, EnergyMeter, ReplicaMeter, ReplicaMeters
from server.telemetry.power_sources import SteadySource, TraceSource, UnavailableSource
from server.telemetry.recorder import RequestRecorder
from server.telemetry.request_record import RequestRecord
from tests.server.telemetry.fake_dcgm_exporter import ExporterProcess
from tests.support import Stack, free_port, gateway_stats, http_get, start_stack, uvicorn_in_thread, wait_for

PROMPTS = ["Đơn hàng #12345 của tôi đang ở đâu?", "Chính sách đổi trả thế nào?", "Tôi muốn dùng mã giảm giá."]


@dataclass
class Counted:
    """What the client saw: requests answered and the tokens vLLM's usage reported to it."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: object) -> None:
        self.requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens


def run_workload(
    base_url: str, max_tokens: int = 12, extra: dict | None = None, prompts: list[str] = PROMPTS
) -> Counted:
    """Streamed and whole chat and text completions, every one with usage visible to the client:
    four requests per prompt.

    Every answer runs to `max_tokens` (`ignore_eos`): a random model's answer may otherwise end
    at its first token with no text, and a stream without text has no time to first token.
    """
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    counted = Counted()
    body = {"max_tokens": max_tokens, "extra_body": {"ignore_eos": True, **(extra or {})}}
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        counted.add(client.chat.completions.create(model="student", messages=messages, **body).usage)
        usage = None
        for chunk in client.chat.completions.create(
            model="student", messages=messages, stream=True, stream_options={"include_usage": True}, **body
        ):
            usage = chunk.usage or usage
        counted.add(usage)
        counted.add(client.completions.create(model="student", prompt=prompt, **body).usage)
        for chunk in client.completions.create(
            model="student", prompt=prompt, stream=True, stream_options={"include_usage": True}, **body
        ):
            usage = chunk.usage or usage
        counted.add(usage)
    return counted


def metric_sums(url: str) -> dict[str, float]:
    """Each sample name of /metrics (parsed by prometheus-client) summed over its labels."""
    status, body = http_get(f"{url}/metrics")
    assert status == 200
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = sample.name if sample.name != "student_energy_joules_total" else f"energy_{sample.labels['kind']}"
            sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def ledger_sums(path: Path) -> Counted:
    rows = read_requests(path)
    return Counted(len(rows), sum(r.prompt_tokens or 0 for r in rows), sum(r.completion_tokens or 0 for r in rows))


def test_stats_metrics_and_ledger_agree_exactly_with_the_client(stack: Stack) -> None:
    assert wait_for(lambda: gateway_stats(stack.url)["requests"]["in_flight"] == 0, 60)
    stats_before, metrics_before = gateway_stats(stack.url), metric_sums(stack.url)
    ledger_before = ledger_sums(stack.ledger_path)

    counted = run_workload(stack.url)

    after = gateway_stats(stack.url)
    assert after["requests"]["total"] - stats_before["requests"]["total"] == counted.requests == 12
    assert after["requests"]["ok"] - stats_before["requests"]["ok"] == counted.requests
    assert after["requests"]["error"] == stats_before["requests"]["error"]
    assert after["tokens"]["prompt"] - stats_before["tokens"]["prompt"] == counted.prompt_tokens
    assert after["tokens"]["completion"] - stats_before["tokens"]["completion"] == counted.completion_tokens

    metrics_after = metric_sums(stack.url)
    for name, expected in (
        ("student_requests_total", counted.requests),
        ("student_prompt_tokens_total", counted.prompt_tokens),
        ("student_completion_tokens_total", counted.completion_tokens),
        ("student_e2e_request_latency_seconds_count", counted.requests),
        ("student_time_to_first_token_seconds_count", counted.requests // 2),  # the streams
    ):
        assert metrics_after[name] - metrics_before.get(name, 0.0) == expected, name

    ledger_after = ledger_sums(stack.ledger_path)
    assert ledger_after.requests - ledger_before.requests == counted.requests
    assert ledger_after.prompt_tokens - ledger_before.prompt_tokens == counted.prompt_tokens
    assert ledger_after.completion_tokens - ledger_before.completion_tokens == counted.completion_tokens

    latency = after["latency_ms"]
    assert latency["e2e"]["count"] >= counted.requests and latency["e2e"]["p50"] > 0
    assert latency["ttft"]["p50"] <= latency["e2e"]["p99"]
    assert after["upstream"]["error"] is None and after["upstream"]["running"] == 0


def test_a_window_counts_only_its_own_requests(stack: Stack) -> None:
    run_workload(stack.url, max_tokens=2)
    assert wait_for(lambda: gateway_stats(stack.url, window_s=1.0)["requests"]["total"] == 0, 30), (
        "a 1 s window still counts requests that finished earlier"
    )
    counted = run_workload(stack.url, max_tokens=2)
    recent = gateway_stats(stack.url, window_s=1.0 + 1.0)
    assert recent["window_s"] == 2.0
    assert recent["requests"]["total"] >= 1  # the workload takes longer than the window on a slow box
    assert gateway_stats(stack.url, window_s=600)["requests"]["total"] >= 2 * counted.requests


def test_energy_here_is_unavailable_with_a_reason_everywhere(stack: Stack) -> None:
    run_workload(stack.url, max_tokens=2)  # requests of its own: it must not rely on earlier tests
    energy, cost = gateway_stats(stack.url)["energy"], gateway_stats(stack.url)["cost"]
    assert energy["status"] == "unavailable" and "NVML" in energy["reason"] and "RAPL" in energy["reason"]
    assert energy["total_j"] is None and energy["power_w"] is None  # never a 0 J that was not measured
    assert cost["electricity"] is None and cost["projected_month"] is None and cost["per_request"] is None
    assert cost["api_equivalent"]["gpt-4.1"]["cost_usd"] > 0  # tokens are still counted
    sums = metric_sums(stack.url)
    assert sums["student_energy_measured"] == 0 and "energy_total" not in sums
    rows = read_requests(stack.ledger_path)
    assert rows and all(row.energy_j is None and row.electricity_cost is None for row in rows)


@pytest.mark.parametrize("bad", ["0", "-5", "abc"])
def test_a_bad_window_is_a_400_in_openai_shape(stack: Stack, bad: str) -> None:
    status, body = http_get(f"{stack.url}/stats?window={bad}")
    assert status == 400 and json.loads(body)["error"]["param"] == "window"


def test_the_ledger_keeps_every_finished_request_through_a_sigkill(stack: Stack, tmp_path: Path) -> None:
    gateway = start_stack(["--upstream", stack.vllm_url], tmp_path / "gateway.log")
    try:
        gateway.wait_ready(60)
        counted = run_workload(gateway.url, max_tokens=4)
    finally:
        gateway.stop(signal.SIGKILL)  # at once: no shutdown code runs
    assert gateway.process.returncode == -signal.SIGKILL
    assert ledger_sums(gateway.ledger_path) == counted


@pytest.fixture
def measured_gateway(stack: Stack, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """The real gateway app in-process, in front of the session's vLLM, on a steady 100 W source."""
    settings = Settings(
        upstream_url=stack.vllm_url, port=free_port(), ledger_path=tmp_path / "ledger.sqlite3", idle_w=20.0
    )
    source = SteadySource(100.0, name="steady-test-source", reason="constant power for tests")
    app = create_app(settings, power_source=source)
    with uvicorn_in_thread(app, settings.port):
        yield f"http://127.0.0.1:{settings.port}", settings


def test_measured_energy_is_attributed_to_every_request_and_adds_up(
    measured_gateway: tuple[str, Settings],
) -> None:
    url, settings = measured_gateway
    long_enough = {"ignore_eos": True}  # 400 tokens: each request spans several 0.1 s meter intervals
    workers = [threading.Thread(target=run_workload, args=(url, 400, long_enough)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    plain = OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
        model="student",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        stream=True,
        max_tokens=400,
        extra_body=long_enough,
    )
    chunks = list(plain)
    assert all(chunk.usage is None for chunk in chunks)  # the running usage asked for the meter is removed
    assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) > 0

    now = gateway_stats(url)
    energy = now["energy"]
    assert (energy["status"], energy["source"]) == ("ok", "steady-test-source")
    rows = read_requests(settings.ledger_path)
    assert len(rows) == 25 and now["requests"]["total"] == 25
    assert all(row.energy_j is not None and row.energy_j > 0 for row in rows)
    assert all(row.electricity_cost == pytest.approx(row.energy_j / 3.6e6 * 2998.0) for row in rows)
    attributed_j = energy["active_j"] - energy["unattributed_j"]
    assert sum(row.energy_j for row in rows) == pytest.approx(attributed_j, rel=1e-9)
    assert energy["total_j"] == pytest.approx(energy["active_j"] + energy["idle_j"], rel=1e-9)
    assert energy["idle_j"] == pytest.approx(20.0 * now["uptime_s"], rel=0.1)

    cost = now["cost"]
    assert cost["electricity"] == pytest.approx(energy["total_j"] / 3.6e6 * 2998.0, rel=0.05)
    assert cost["per_request"] > 0 and cost["projected_month"] > 0
    assert cost["api_equivalent"]["gpt-4.1"]["saving_usd"] is not None

    sums = metric_sums(url)
    assert sums["student_energy_measured"] == 1 and sums["energy_total"] > 0
    assert sums["student_request_energy_joules_total"] == pytest.approx(attributed_j, rel=1e-9)
    assert sums["student_power_watts"] == 100.0


# --- energy per replica ----------------------------------------------------------------------

R1, R2 = "http://gpu1:8001", "http://gpu2:8001"


def test_a_request_is_attributed_to_the_meter_of_the_replica_that_served_it(tmp_path: Path) -> None:
    """As the proxy does it: `begin` before the replica is picked, `record.upstream` set right after."""
    settings = Settings(upstream_urls=[R1, R2], ledger_path=tmp_path / "ledger.sqlite3")
    first = EnergyMeter(TraceSource([(0, 0.0, None), (1, 100.0, None)], name="dcgm"), idle_w=0.0)
    second = EnergyMeter(TraceSource([(0, 0.0, None), (1, 40.0, None)], name="dcgm"), idle_w=0.0)
    meters = ReplicaMeters([ReplicaMeter(R1, first, (R1,), "http://gpu1:9400/metrics"),
                            ReplicaMeter(R2, second, (R2,), "http://gpu2:9400/metrics")])  # fmt: skip
    ledger = Ledger(settings.ledger_path)
    recorder = RequestRecorder(settings, meters, ledger)

    async def serve() -> tuple[RequestRecord, RequestRecord]:
        for meter in (first, second):
            meter.tick(meter.source.read())  # the baselines
        on_r2 = RequestRecord("/v1/completions", "gateway", stream=True)
        retried = RequestRecord("/v1/completions", "gateway", stream=True)
        for record, upstream in ((on_r2, R2), (retried, R1)):
            sink = recorder.token_sink(record)
            recorder.begin(record)
            record.upstream = upstream  # the proxy's pick, in the same step of the event loop
            await asyncio.sleep(0)
            assert sink is not None
            sink(5)
        retried.upstream = R2  # R1 refused the connection: the proxy tried R2, which answers
        recorder.token_sink(retried)(15)
        for meter in (first, second):
            meter.tick(meter.source.read())  # R2's 40 J: 5 tokens to one, 15 to the other; R1's 100 J to nobody
        for record in (on_r2, retried):
            record.status = 200
            recorder.finish(record)
        return on_r2, retried

    on_r2, retried = asyncio.run(serve())
    assert (on_r2.energy_j, retried.energy_j) == (pytest.approx(10.0), pytest.approx(30.0))
    assert first.snapshot().unattributed_j == pytest.approx(100.0)
    recorder.write_energy_rows()
    ledger.close()
    rows = {row.replica: row for row in read_energy(settings.ledger_path)}
    assert set(rows) == {R1, R2}
    assert (rows[R2].total_j, rows[R2].attributed_j, rows[R1].unattributed_j) == (40.0, 40.0, 100.0)
    assert {row.upstream for row in read_requests(settings.ledger_path)} == {R2}


def test_one_meter_for_all_replicas_takes_every_request_at_once(tmp_path: Path) -> None:
    settings = Settings(upstream_urls=[R1, R2], ledger_path=tmp_path / "ledger.sqlite3")
    meter = EnergyMeter(TraceSource([(0, 0.0, None), (1, 10.0, None)]), idle_w=0.0)
    ledger = Ledger(settings.ledger_path)
    recorder = RequestRecorder(settings, meter, ledger)  # a bare meter: the local one for every replica
    record = RequestRecord("/v1/completions", "gateway", stream=False)
    meter.tick(meter.source.read())
    recorder.begin(record)  # no event loop needed: it joins now
    record.upstream = R1
    meter.tick(meter.source.read())
    record.status = 200
    recorder.finish(record)
    recorder.write_energy_rows()
    ledger.close()
    assert record.energy_j == pytest.approx(10.0)
    assert [(row.replica, row.total_j) for row in read_energy(settings.ledger_path)] == [(None, 10.0)]
    assert recorder.meters.meters[0].key == LOCAL_METER


@pytest.fixture
def exporter() -> Iterator[ExporterProcess]:
    """The DCGM exporter of the replica's host (a process of its own): 100 W on GPU 0 until a test
    loads it."""
    running = ExporterProcess(watts={"0": 100.0, "1": 70.0})
    try:
        yield running
    finally:
        running.stop()


def test_a_replicas_energy_comes_from_the_dcgm_exporter_on_its_host(
    stack: Stack, exporter: ExporterProcess, tmp_path: Path
) -> None:
    settings = Settings(
        upstream_url=stack.vllm_url, port=free_port(), ledger_path=tmp_path / "ledger.sqlite3",
        energy_exporters=[f"{stack.vllm_url}={exporter.url}#0"], energy_exporter_interval_s=0.25,
        energy_ledger_interval_s=1.0, idle_window_s=1.0,
    )  # fmt: skip
    app = create_app(settings, power_source=UnavailableSource("this test host has no GPU"))
    url = f"http://127.0.0.1:{settings.port}"

    def replica() -> dict:
        (entry,) = gateway_stats(url)["energy"]["replicas"]
        return entry

    with uvicorn_in_thread(app, settings.port):
        assert wait_for(lambda: replica()["status"] == "ok" and not replica()["idle_measuring"], 60), replica()
        assert replica()["idle_w"] == pytest.approx(100.0, rel=0.05)
        exporter.set_watts("0", 400.0)  # the replica's GPU at work: 300 W above idle while it is loaded
        # Each answer spans readings (about 2 s each here, the exporter read every 0.25 s when the CPU allows);
        # one prompt's four kinds of request are enough.
        counted = run_workload(url, max_tokens=1024, extra={"ignore_eos": True}, prompts=PROMPTS[:1])
        exporter.set_watts("0", 100.0)

        stats = gateway_stats(url)
        entry, energy = stats["energy"]["replicas"][0], stats["energy"]
        assert (entry["urls"], entry["exporter"], entry["source"]) == ([stack.vllm_url], exporter.url, "dcgm")
        assert entry["status"] == "ok" and entry["reason"].startswith(f"DCGM exporter {exporter.url}")
        assert entry["total_j"] > 0 and entry["attributed_j"] > 0
        assert entry["attributed_j"] + entry["unattributed_j"] + entry["idle_j"] == pytest.approx(entry["total_j"])
        assert (energy["status"], energy["source"], energy["total_j"]) == ("ok", "dcgm", entry["total_j"])
        rows = read_requests(settings.ledger_path)
        assert len(rows) == counted.requests and {row.upstream for row in rows} == {stack.vllm_url}
        measured = [row.energy_j for row in rows if row.energy_j is not None]
        # None: no reading of the exporter fell inside the request, or one failed while it ran (on a
        # box this busy the gateway's sampler thread gets little CPU): unknown, never 0 J for it.
        assert any(energy_j > 0 for energy_j in measured) and all(energy_j >= 0 for energy_j in measured)
        assert sum(measured) == pytest.approx(entry["attributed_j"], rel=1e-9)

        exporter.stop()  # the exporter on the replica's host goes away; the replica itself does not
        assert wait_for(lambda: replica()["status"] == "unavailable", 30), replica()
        down = replica()
        assert down["total_j"] is None and down["electricity"] is None
        assert down["reason"] == (
            f"DCGM exporter {exporter.url} unreachable: connection refused: is the exporter running, and is its "
            "port open?"
        )
        assert gateway_stats(url)["energy"]["status"] == "unavailable"
        later = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(
            model="student", prompt=PROMPTS[0], max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert later.usage is not None and later.usage.completion_tokens == 4  # requests still succeed
    last = read_requests(settings.ledger_path)[-1]
    assert (last.upstream, last.energy_j, last.electricity_cost) == (stack.vllm_url, None, None)

    energy_rows = read_energy(settings.ledger_path)
    assert energy_rows and {row.replica for row in energy_rows} == {stack.vllm_url}
    assert any(row.status == "ok" and (row.total_j or 0) > 0 for row in energy_rows)
    assert energy_rows[-1].status == "unavailable" and energy_rows[-1].reason == down["reason"]
    for row in energy_rows:  # each measured window conserved on its own
        if row.status == "ok":
            assert (row.attributed_j or 0) + (row.unattributed_j or 0) + (row.idle_j or 0) == pytest.approx(row.total_j)
    (day,) = daily_summary(settings.ledger_path, 0.0)
    assert set(day.replicas) == {stack.vllm_url} and day.replicas[stack.vllm_url].energy_status == "partial"
