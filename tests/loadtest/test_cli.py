"""`student load` end to end: every scenario, time-compressed, against the real stack on the tiny model.

Each run is a real `student load` process (Locust and its gevent patching stay out of pytest).
Loads stay small (≤ ~4 req/s, 8-token answers) for a 2-core machine and `--max-num-seqs 2`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.runtime.cli import build_parser
from tests.support import STUDENT, Stack

SMALL = [
    "--prompt-tokens",
    "30",
    "--output-tokens",
    "8",
    "--length-sigma",
    "0",
    "--system-prompt",
    "Bạn là trợ lý chăm sóc khách hàng của cửa hàng.",
    "--progress-interval-s",
    "3",
    "--sample-interval-s",
    "1",
]
# Generous latency limits: these tests check the machinery, not the tiny model's speed on a shared box.
LOOSE_SLO = ["--slo-ttft-p95-ms", "30000", "--slo-tpot-p95-ms", "5000", "--slo-max-error-rate", "0.2"]
RATE_TOLERANCE = 0.05


def student_load(stack: Stack, out: Path, *args: str, timeout_s: float = 120) -> tuple[int, dict, str]:
    started = time.monotonic()
    done = subprocess.run(
        [STUDENT, "load", *args, "--target", stack.url, "--out", str(out), *SMALL],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    log = done.stderr + done.stdout
    print(f"student load {args[0]}: exit {done.returncode} in {time.monotonic() - started:.1f} s\n{log[-3000:]}")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return done.returncode, report, log


def assert_common_report(report: dict, out: Path, scenario: str, stack: Stack) -> None:
    assert report["scenario"] == scenario and report["target"] == stack.url
    arrivals = report["arrivals"]
    assert arrivals["target_rps"] > 0
    assert abs(arrivals["achieved_rps"] / arrivals["target_rps"] - 1) <= RATE_TOLERANCE, arrivals
    assert report["requests"]["ok"] + report["requests"]["error"] == report["requests"]["total"] > 0
    for metric in ("ttft", "tpot", "e2e"):
        assert report["latency_ms"][metric]["p95"] is not None
    assert report["tokens"]["completion_mean"] == 8.0  # ignore_eos holds answers to max_tokens; from usage
    assert isinstance(report["slo"]["passed"], bool)
    assert report["gateway"]["requests"]["total"] >= report["requests"]["ok"]  # /stats over the same window
    assert report["gateway"]["upstream"]["url"] == stack.vllm_url
    for name in (
        "report.json",
        "report.md",
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust.html",
        "arrival_rate.png",
        "latency.png",
        "throughput.png",
        "memory.png",
    ):
        assert (out / name).stat().st_size > 0, name
    stats_csv = (out / "locust_stats.csv").read_text()
    for row in ("POST,/v1/chat/completions", "METRIC,ttft_ms", "METRIC,tpot_ms", "METRIC,completion_tokens"):
        assert row in stats_csv
    assert "SLO" in (out / "report.md").read_text()


def test_load_help_does_not_import_locust() -> None:
    code = (
        "import sys; from server.runtime.cli import build_parser; build_parser('load'); "
        "print('locust' in sys.modules or 'gevent' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    args = build_parser("load").parse_args(["load", "daily", "--target", "http://x", "--day-seconds", "60"])
    assert (args.scenario, args.requests_per_day, args.day_seconds) == ("daily", 10_000, 60.0)


def test_daily_with_two_local_workers_gives_one_merged_result(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "daily"
    code, report, log = student_load(
        stack, out, "daily", "--requests-per-day", "80", "--day-seconds", "32", "--workers", "2", *LOOSE_SLO
    )
    assert_common_report(report, out, "daily", stack)
    assert code == (0 if report["slo"]["passed"] else 1)
    assert report["generator"]["workers"] == 2
    assert report["requests"]["total"] == report["arrivals"]["scheduled"] == 80  # both workers' halves, merged
    assert "POST,/v1/chat/completions,80," in (out / "locust_stats.csv").read_text()  # Locust merged them too
    daily = report["daily"]
    assert daily["requests_per_day"] == 80 and daily["peak_hour"]["requests"] > 0
    assert daily["energy"]["status"] == "unavailable" and daily["energy"]["reason"]  # no NVML/RAPL here
    assert daily["cost"]["electricity_per_day"] is None
    assert daily["cost"]["api_equivalent"]["gpt-4.1"]["per_day_usd"] > 0
    assert "[daily]" in log  # progress lines while it ran


def test_capacity_reports_the_sustainable_rate(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "capacity"
    code, report, _ = student_load(
        stack,
        out,
        "capacity",
        "--start-rps",
        "1",
        "--step-rps",
        "1",
        "--max-rps",
        "3",
        "--step-seconds",
        "7",
        "--step-grace-s",
        "10",
        *LOOSE_SLO,
    )
    assert_common_report(report, out, "capacity", stack)
    capacity = report["capacity"]
    assert capacity["max_sustainable_rps"] in (1.0, 2.0, 3.0)
    assert capacity["max_requests_per_day"] == pytest.approx(
        capacity["max_sustainable_rps"] * 86_400 / capacity["peak_factor"], abs=2
    )
    assert code == 0 and report["slo"]["passed"]  # ≥ 1 req/s at peak carries 10,000 requests a day


def test_forced_slo_failure_exits_non_zero(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "forced"
    code, report, log = student_load(
        stack,
        out,
        "capacity",
        "--start-rps",
        "2",
        "--step-rps",
        "1",
        "--max-rps",
        "3",
        "--step-seconds",
        "6",
        "--slo-ttft-p95-ms",
        "0.001",
    )
    assert code == 1, log
    assert report["slo"]["passed"] is False and "SLO FAILED" in log
    assert report["capacity"]["max_sustainable_rps"] == 0.0 and report["capacity"]["max_requests_per_day"] == 0
    assert report["stopped_early"] and "step0" in report["stopped_early"]  # no need to play the next step
    assert report["requests"]["total"] >= 12


def test_soak_reports_latency_and_memory_drift(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    code, report, _ = student_load(stack, out, "soak", "--rps", "3", "--duration-s", "15", *LOOSE_SLO)
    assert_common_report(report, out, "soak", stack)
    assert code == (0 if report["slo"]["passed"] else 1)
    soak = report["soak"]
    assert len(soak["latency_drift"]["windows"]) == 3
    for name in ("gateway", "vllm"):  # the stack is local: both found by their listening ports
        assert soak["memory_drift"][name]["measured"], soak["memory_drift"][name]
        assert soak["memory_drift"][name]["end_mib"] > 10
    assert soak["memory_drift"]["gateway"]["pid"] == stack.process.pid


def test_burst_reports_recovery_and_errors(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "burst"
    code, report, _ = student_load(
        stack,
        out,
        "burst",
        "--rps",
        "1.5",
        "--burst-factor",
        "3",
        "--burst-seconds",
        "5",
        "--burst-at-s",
        "6",
        "--duration-s",
        "18",
        *LOOSE_SLO,
    )
    assert_common_report(report, out, "burst", stack)
    assert code == (0 if report["slo"]["passed"] else 1)
    burst = report["burst"]
    assert burst["spike_from_s"] == 6 and burst["spike_to_s"] == 11
    assert "recovery_s" in burst and burst["recovery_threshold_ms"] > 0
    assert set(burst["errors"]) >= {"total", "before", "spike", "after"}
    assert burst["latency_ms"]["spike"]["ttft"]["count"] > 0
    assert report["requests"]["total"] == report["arrivals"]["scheduled"] == 42  # 1.5 × 13 s + 4.5 × 5 s
