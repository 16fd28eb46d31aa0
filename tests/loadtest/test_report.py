from __future__ import annotations

import json

from loadtest.profile import DailyProfile
from loadtest.report import build_report, write_report
from loadtest.scenarios import Daily
from loadtest.slo import Slo
from loadtest.workload import Workload, load_prompt_set
from tests.loadtest.helpers import run_of


def test_report_folder_holds_json_markdown_and_plots(tmp_path) -> None:
    daily = Daily(480, 96.0, DailyProfile())
    curve = daily.curve()
    run = run_of(curve, memory=[{"t": 0.0, "gateway": 80.0, "vllm": None}, {"t": 90.0, "gateway": 81.0, "vllm": None}])
    block, verdict = daily.judge(run, curve, Slo())
    workload = Workload(prompt_set=load_prompt_set(None))
    report = build_report(
        "daily", "http://gw", curve, run, workload, seed=0, burstiness=1.0, scenario_block=block, verdict=verdict
    )
    files = write_report(report, run, curve, tmp_path)
    assert {"report.json", "report.md", "arrival_rate.png", "latency.png", "throughput.png", "memory.png"} <= set(files)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["scenario"] == "daily" and saved["slo"]["passed"] is True
    assert saved["arrivals"]["target_rps"] == saved["arrivals"]["achieved_rps"] == 5.0
    assert saved["requests"] == {"total": 480, "ok": 480, "error": 0, "error_rate": 0.0, "errors": {}}
    assert saved["latency_ms"]["ttft"]["p95"] == 50.0
    assert saved["daily"]["energy"]["status"] == "unavailable"
    markdown = (tmp_path / "report.md").read_text()
    assert "**SLO PASSED**" in markdown and "not measured: no NVML, no RAPL" in markdown
    assert "0 kWh" not in markdown
    for png in ("arrival_rate.png", "latency.png", "throughput.png", "memory.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
