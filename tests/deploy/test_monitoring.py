"""deploy/monitoring/ with the real tools: promtool, a real Prometheus, the real stack.

promtool checks the config and the rules and runs the alerts' unit tests (rules/tests.yml). A real
Prometheus, configured from deploy/monitoring/prometheus.yml with the targets swapped for this
session's, scrapes the real gateway (`student serve`), its vLLM, and a second real gateway on the
same vLLM that measures a steady stand-in power source with a power cap and has an API key (so the
energy, cost and per-key series exist). After some chat completions, every query of the dashboard
and of the rules must return data. Grafana is not packaged here: its files are checked for structure,
and their queries are the ones Prometheus answered.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from loadtest.slo import DEFAULT_MAX_ERROR_RATE, DEFAULT_TPOT_P95_MS, DEFAULT_TTFT_P95_MS
from server.gateway.app import create_app
from server.runtime.ports import free_port
from server.runtime.settings import Settings
from server.telemetry.power_sources import SteadySource
from tests.support import REPO_ROOT, Stack, http_get, metric_samples, uvicorn_in_thread, wait_for

MONITORING = REPO_ROOT / "deploy" / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
RECORDING = MONITORING / "rules" / "recording.yml"
ALERTS = MONITORING / "rules" / "alerts.yml"
RULE_TESTS = MONITORING / "rules" / "tests.yml"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "student-serve.json"

GATEWAY_JOB, VLLM_JOB = "student-gateway", "vllm"
API_KEY = ("monitoring", "sk-monitoring-test-key")
COMPARISON = re.compile(r"(?<=\s)(==|!=|>=|<=|>|<)(?=\s)")
# What a query may name besides recording rules and the gateway's own metrics.
VLLM_METRICS = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "rate", "increase", "histogram_quantile", "offset",
}  # fmt: skip


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"no {name} on PATH: run scripts/install-prometheus.sh (`make test` does)")
    return found


def run_tool(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run([tool(args[0]), *args[1:]], input=stdin, capture_output=True, timeout=120, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"{' '.join(args)}:\n{output}"
    return output


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def data_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def panel_queries() -> list[str]:
    return [target["expr"] for panel in data_panels() for target in panel["targets"]]


def alert_condition(expr: str) -> str:
    """The alert's expression with its comparison as `bool`: a series (0 or 1) whether it fires or not."""
    assert len(COMPARISON.findall(expr)) == 1, f"one comparison, spaced, expected in {expr!r}"
    return COMPARISON.sub(r"\1 bool", expr)


def queries_to_answer() -> dict[str, str]:
    """Every query the dashboard and the rules run, and what it is for."""
    wanted = {expr: "dashboard" for expr in panel_queries()}
    for rule in rules(RECORDING):
        wanted[rule["expr"]] = f"recording rule {rule['record']}"
        wanted[rule["record"]] = f"series recorded by {rule['record']}"
    for rule in rules(ALERTS):
        wanted[alert_condition(rule["expr"])] = f"alert {rule['alert']}"
    return wanted


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (labels, strings, functions and numbers left out)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = {
        word.group() for word in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
        if not text[word.end():].lstrip().startswith("(")  # a function
    }  # fmt: skip
    return names - PROMQL_WORDS


def gateway_metric_names() -> set[str]:
    """Every series name the gateway can expose, with every optional part switched on."""
    from server.accounting.tariff import default_api_prices
    from server.control.admission import Slots
    from server.telemetry.metrics import GatewayMetrics, LiveFigures
    from server.telemetry.request_record import RequestRecord
    from tests.server.telemetry.test_metrics import ok_snapshot

    metrics = GatewayMetrics(lambda: LiveFigures(ok_snapshot(), 1.0, "VND", 0, 0.0))
    metrics.add_admission(Slots(1, 1))
    metrics.add_power_limit(lambda: 300.0)
    metrics.add_api_prices(default_api_prices())
    metrics.add_replicas(lambda: [{"url": "http://vllm:8001", "healthy": True, "outstanding": 0}])
    record = RequestRecord("/v1/chat/completions", "http://vllm:8001", True, started_s=1.0, status=200)
    record.first_token_s, record.finished_s, record.completion_tokens = 1.1, 2.0, 5
    metrics.observe(record, 0.0)
    text = metrics.render().decode()
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.MULTILINE))


# --- promtool, no stack ---------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules() -> None:
    run_tool("promtool", "check", "config", str(PROMETHEUS_YML))  # checks the rule files it names, too
    run_tool("promtool", "check", "rules", str(RECORDING), str(ALERTS))


def test_the_alerts_unit_tests_pass() -> None:
    run_tool("promtool", "test", "rules", str(RULE_TESTS))


def test_the_config_loads_both_rule_files() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert {(PROMETHEUS_YML.parent / name).resolve() for name in config["rule_files"]} == {RECORDING, ALERTS}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[GATEWAY_JOB]["metrics_path"] == jobs[VLLM_JOB]["metrics_path"] == "/metrics"


def test_every_alert_has_a_for_a_severity_and_its_annotations() -> None:
    for rule in rules(ALERTS):
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, rule["alert"]
        assert all(text.strip() for text in rule["annotations"].values()), rule["alert"]


def test_each_alert_has_a_unit_test_that_fires_it_and_one_that_finds_it_quiet() -> None:
    cases: dict[str, list[list]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            cases.setdefault(check["alertname"], []).append(check["exp_alerts"])
    assert set(cases) == {rule["alert"] for rule in rules(ALERTS)}
    for alert, expected in cases.items():
        assert [] in expected and any(expected), alert


def test_the_slo_alerts_and_panels_use_the_load_tests_objective() -> None:
    slo_alerts = ("StudentTtftP95AboveSlo", "StudentTpotP95AboveSlo", "StudentErrorRatioHigh")
    threshold = {
        rule["alert"]: float(rule["expr"].split(" > ")[1]) for rule in rules(ALERTS) if rule["alert"] in slo_alerts
    }
    assert threshold["StudentTtftP95AboveSlo"] == DEFAULT_TTFT_P95_MS / 1000
    assert threshold["StudentTpotP95AboveSlo"] == DEFAULT_TPOT_P95_MS / 1000
    assert threshold["StudentErrorRatioHigh"] == DEFAULT_MAX_ERROR_RATE
    lines = {
        target["expr"]: panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]
        for panel in data_panels()
        if "thresholds" in panel["fieldConfig"]["defaults"]
        for target in panel["targets"]
    }
    assert lines["job:student_time_to_first_token_seconds:p95_5m"] == DEFAULT_TTFT_P95_MS / 1000
    assert lines["job:student_time_per_output_token_seconds:p95_5m"] == DEFAULT_TPOT_P95_MS / 1000
    assert lines["job_route:student_request_errors:ratio_rate5m"] == DEFAULT_MAX_ERROR_RATE


# --- Grafana's files -----------------------------------------------------------------------------


def test_the_dashboard_is_well_formed_and_uses_the_provisioned_data_source() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in data_panels():
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "table"}, panel
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"] and target["expr"].strip(), panel["title"]


def test_the_dashboard_covers_latency_throughput_queue_kv_cache_energy_cost_routes_and_keys() -> None:
    read = set().union(*(metric_names(expr) for expr in panel_queries()))
    recorded = {rule["record"] for rule in rules(RECORDING)}
    assert recorded <= read, f"recorded but not shown: {recorded - read}"
    assert {
        "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "student_admission_waiting_requests",
        "student_admission_answering_requests", "student_admission_rejected_requests_total", "student_power_watts",
        "student_power_limit_watts", "student_energy_measured", "student_routed_requests_total",
        "student_key_requests_total", "student_key_tokens_total",
    } <= read  # fmt: skip


def test_every_query_reads_only_recording_rules_gateway_metrics_vllm_metrics_or_up() -> None:
    """A misspelt name would return nothing; the live test below runs every query to be sure."""
    known = {rule["record"] for rule in rules(RECORDING)} | gateway_metric_names() | VLLM_METRICS | {"up"}
    expressions = [*panel_queries(), *(r["expr"] for r in rules(RECORDING)), *(r["expr"] for r in rules(ALERTS))]
    unknown = {expr: metric_names(expr) - known for expr in expressions if metric_names(expr) - known}
    assert not unknown


# --- the real stack and a real Prometheus ------------------------------------------------------------


class CappedSteadySource(SteadySource):
    """A steady stand-in that also reports an enforced power cap, as NVML does."""

    def power_limit_w(self) -> float:
        return 150.0


@dataclass
class Scraped:
    prometheus_url: str
    gateways: list[str]  # the session's `student serve`, then the measured in-process one

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = http_get(f"{self.prometheus_url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout_s=10)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def has_seen(self, completion_tokens: dict[str, float]) -> bool:
        """Whether the last scrape of each gateway (by instance) counted at least these output tokens."""
        scraped = {
            series["metric"]["instance"]: float(series["value"][1])
            for series in self.query(f'sum by (instance) (student_completion_tokens_total{{job="{GATEWAY_JOB}"}})')
        }
        return all(scraped.get(instance, -1.0) >= tokens for instance, tokens in completion_tokens.items())

    def targets(self) -> list[dict[str, Any]]:
        return json.loads(http_get(f"{self.prometheus_url}/api/v1/targets")[1])["data"]["activeTargets"]


def host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def prometheus_config(stack: Stack, measured_url: str) -> dict[str, Any]:
    """deploy/monitoring/prometheus.yml pointed at this session's processes, scraping every second."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_YML.parent / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs[GATEWAY_JOB]["static_configs"] = [{"targets": [host(stack.url), host(measured_url)]}]
    jobs[VLLM_JOB]["static_configs"] = [{"targets": [host(stack.vllm_url)]}]
    config["scrape_configs"] = [jobs[GATEWAY_JOB], jobs[VLLM_JOB]]  # no DCGM exporter here
    return config


def completion_tokens(gateway_url: str) -> float:
    """The output tokens a gateway has counted so far, from its own /metrics."""
    return sum(value for _, value in metric_samples(gateway_url, "student_completion_tokens_total"))


def chat(base_url: str, api_key: str, stream: bool) -> None:
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
    request = {
        "model": "student", "messages": [{"role": "user", "content": "Đơn hàng của tôi đang ở đâu?"}],
        "max_tokens": 6, "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **request))
        assert chunks
    else:
        assert client.chat.completions.create(**request).usage.completion_tokens == 6


@pytest.fixture(scope="module")
def measured_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gateway in-process on the session's vLLM, measuring a steady 100 W stand-in capped at 150 W."""
    settings = Settings(
        upstream_url=stack.vllm_url, port=free_port(), idle_w=20.0, api_keys="=".join(API_KEY),
        ledger_path=tmp_path_factory.mktemp("measured-gateway") / "ledger.sqlite3",
    )  # fmt: skip
    source = CappedSteadySource(100.0, name="steady-test-source", reason="constant power for tests")
    with uvicorn_in_thread(create_app(settings, power_source=source), settings.port):
        yield f"http://127.0.0.1:{settings.port}"


@pytest.fixture(scope="module")
def scraped(stack: Stack, measured_gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """A real Prometheus scraping both gateways and vLLM, after two rounds of chat completions."""
    directory = tmp_path_factory.mktemp("prometheus")
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(stack, measured_gateway)))
    run_tool("promtool", "check", "config", str(config_path))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    scraped = Scraped(f"http://127.0.0.1:{port}", [stack.url, measured_gateway])
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()[-4000:]}"
            try:
                return http_get(f"{scraped.prometheus_url}/-/ready", timeout_s=2)[0] == 200
            except OSError:
                return False

        assert wait_for(ready, 120, interval_s=0.5), log_path.read_text()[-4000:]
        keys = ["unused", API_KEY[1]]
        for _ in range(2):  # the second round moves counters Prometheus has already seen: rates above 0
            for url, key in zip(scraped.gateways, keys, strict=True):
                chat(url, key, stream=False)
                chat(url, key, stream=True)
            served = {host(url): completion_tokens(url) for url in scraped.gateways}
            assert wait_for(partial(scraped.has_seen, served), 120, interval_s=0.5), (served, scraped.targets())
        yield scraped
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def test_promtool_accepts_the_real_gateways_metrics(stack: Stack, measured_gateway: str) -> None:
    chat(measured_gateway, API_KEY[1], stream=True)  # the per-request series exist
    for url in (stack.url, measured_gateway):
        status, text = http_get(f"{url}/metrics")
        assert status == 200
        run_tool("promtool", "check", "metrics", stdin=text)
    assert b"student_power_limit_watts" in http_get(f"{measured_gateway}/metrics")[1]


def test_prometheus_scrapes_the_gateways_and_vllm(stack: Stack, scraped: Scraped) -> None:
    def all_up() -> bool:
        return all(target["health"] == "up" for target in scraped.targets())

    assert wait_for(all_up, 60, interval_s=0.5), scraped.targets()
    scraped_jobs = {(target["labels"]["job"], target["labels"]["instance"]) for target in scraped.targets()}
    assert scraped_jobs == {
        (GATEWAY_JOB, host(stack.url)), (GATEWAY_JOB, host(scraped.gateways[1])), (VLLM_JOB, host(stack.vllm_url))
    }  # fmt: skip


def test_every_dashboard_and_rule_query_returns_data(scraped: Scraped) -> None:
    """Every panel query, recording rule (its expression and the series it records) and alert
    condition returns a series with a number (not NaN) once both gateways have served requests."""
    wanted = queries_to_answer()

    def unanswered() -> dict[str, str]:
        return {
            expr: purpose
            for expr, purpose in wanted.items()
            if not any(math.isfinite(float(series["value"][1])) for series in scraped.query(expr))
        }

    missing: dict[str, str] = {}

    def all_answered() -> bool:
        missing.clear()
        missing.update(unanswered())
        return not missing

    assert wait_for(all_answered, 120, interval_s=1.0), json.dumps(missing, indent=1, ensure_ascii=False)
    keys = {series["metric"]["key"] for series in scraped.query("student_key_requests_total")}
    assert keys == {"anonymous", API_KEY[0]}
    measured = scraped.query("student_energy_measured")
    assert sorted(float(series["value"][1]) for series in measured) == [0.0, 1.0]  # unavailable here, steady there
