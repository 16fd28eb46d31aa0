"""`scripts/gpu_check.py` on this machine: the CPU-side checks pass, the GPU ones say why they skip.

The GPU side itself runs only on a GPU machine (the script is that run). Here its moving parts
(duty-cycle load, collector, phase comparison, idle check, concurrent requests) run on the CPU
against a steady stand-in source, so a broken loop or a wrong sum shows before device time is spent.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from server.telemetry.power_sources import NvmlSource, Reading

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"
CPU_CHECKS = ("trace_conservation", "sampler_cpu_standin", "merge_bf16_cpu")
NVML_CHECKS = (
    "gpu_info",
    "nvml_read_cost",
    "nvml_counter_vs_instant",
    "nvml_idle_baseline",
    "nvml_sampler_cpu",
    "nvml_attribution",
)


def _nvml_reason() -> str | None:
    """None where the real NVML starts, else its reason."""
    source = NvmlSource()
    try:
        return None if source.status == "ok" else source.reason
    finally:
        source.close()


NVML_REASON = _nvml_reason()


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    if NVML_REASON is None:
        pytest.skip("NVML works here: run scripts/gpu_check.py itself (minutes), not this CPU-side test")
    out = tmp_path_factory.mktemp("gpu-check") / "nested" / "gpu-check.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return completed, json.loads(out.read_text(encoding="utf-8"))


def test_cpu_run_exits_0_and_prints_the_table(cpu_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    completed, report = cpu_run
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].split() == ["check", "part", "status", "time", "s", "result"]
    for check in report["checks"]:
        assert any(line.startswith(check["name"]) and check["status"] in line for line in lines)
    assert "3 passed, 0 failed, 8 skipped, 0 error" in completed.stdout
    assert "[gpu-check" in completed.stderr  # progress lines go to stderr


def test_cpu_run_json_structure(cpu_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = cpu_run
    assert report["format"] == "gpu-check/1"
    assert (report["passed"], report["exit_code"]) == (True, 0)
    assert report["counts"] == {"passed": 3, "failed": 0, "skipped": 8, "error": 0}
    assert {"cpu", "cpu_count", "torch", "cuda_available", "nvidia-ml-py"} <= set(report["machine"])
    assert report["thresholds"]["counter_vs_instant_max_pct"] == 2.0
    names = [check["name"] for check in report["checks"]]
    assert names == ["trace_conservation", "sampler_cpu_standin", *NVML_CHECKS, "merge_bf16_cpu", "merge_bf16_cuda", "train_lora_cuda"]
    for check in report["checks"]:
        assert set(check) == {"name", "part", "title", "status", "summary", "reason", "elapsed_s", "metrics"}


def test_gpu_parts_are_skipped_with_the_reason_and_no_numbers(
    cpu_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, report = cpu_run
    checks = {check["name"]: check for check in report["checks"]}
    for name in NVML_CHECKS:
        assert checks[name]["status"] == "skipped"
        assert checks[name]["reason"] == NVML_REASON
        assert checks[name]["reason"].startswith("NVML unavailable")
        assert checks[name]["metrics"] == {}
    assert report["gpu"] is None
    if not torch.cuda.is_available():
        for name in ("merge_bf16_cuda", "train_lora_cuda"):
            cuda = checks[name]
            assert (cuda["status"], cuda["metrics"]) == ("skipped", {})
            assert cuda["reason"].startswith("CUDA unavailable: ")


def test_cpu_parts_pass_with_their_numbers(cpu_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = cpu_run
    checks = {check["name"]: check for check in report["checks"]}
    for name in CPU_CHECKS:
        assert checks[name]["status"] == "passed", checks[name]
        assert checks[name]["reason"] is None
    for variant in checks["trace_conservation"]["metrics"]["variants"].values():
        assert variant["conservation_rel_error"] <= 1e-9
        assert variant["idle_w"] == pytest.approx(80.0)
    sampler = checks["sampler_cpu_standin"]["metrics"]
    assert sampler["ticks"] > 0 and sampler["hz"] == 10.0
    assert 0 < sampler["thread_cpu_pct_of_core"] <= 1.0
    merge = checks["merge_bf16_cpu"]["metrics"]
    assert (merge["device"], merge["dtype"]) == ("cpu", "bfloat16")
    verification = merge["verification"]
    assert verification["passed"] and verification["max_abs_diff"] <= verification["tolerance"]
    assert verification["adapter_effect_max_abs_diff"] > verification["tolerance"]


# --- the GPU side's parts, on the CPU with a stand-in source -------------------------------


def square_wave_readings(counter_scale: float = 1.0, hz: int = 40, seconds: float = 10.0) -> list[Reading]:
    """Power switching between 100 and 400 W every 0.25 s; the counter integrates it exactly (× scale)."""
    readings, energy_j = [], 5_000.0
    steps = int(seconds * hz)
    power = [100.0 if (i // (hz // 4)) % 2 == 0 else 400.0 for i in range(steps + 1)]
    for i in range(steps + 1):
        if i:
            energy_j += counter_scale * (power[i - 1] + power[i]) / 2 / hz
        readings.append(Reading(i / hz, energy_j, power[i]))
    return readings


def phase_run(gpu_check: ModuleType, scales: dict[str, float]) -> Any:
    phases = {}
    for name, scale in scales.items():
        compared = gpu_check.compare_counter_and_instant(square_wave_readings(scale))
        phases[name] = {"duty": 0.0, "achieved_duty": 0.0, **compared}
    return gpu_check.PhaseRun(phases, None, 0.0, None, None, {}, 5.0)


def test_counter_and_instant_agree_on_an_exact_trace(gpu_check: ModuleType) -> None:
    result = gpu_check.compare_counter_and_instant(square_wave_readings())
    assert result["diff_pct"] == pytest.approx(0.0, abs=1e-9)
    assert result["counter_mean_w"] == pytest.approx(250.0, rel=0.01)
    assert result["sample_hz"] == pytest.approx(40.0)
    assert result["instant"]["updates"] == 40  # a new level every quarter second
    assert result["instant"]["median_update_interval_ms"] == pytest.approx(250.0)
    assert result["counter"]["updates"] == 400
    assert result["counter_resets"] == 0


def test_a_counter_3_percent_high_fails_the_2_percent_check(gpu_check: ModuleType) -> None:
    passing = gpu_check.check_counter_vs_instant(phase_run(gpu_check, {"0%": 1.0, "100%": 1.015}))
    assert passing.failures == []
    failing = gpu_check.check_counter_vs_instant(phase_run(gpu_check, {"0%": 1.0, "100%": 1.03}))
    assert len(failing.failures) == 1
    assert failing.failures[0].startswith("100%: instant power integrates to -2.91% of the counter")


def test_duty_phases_collector_and_idle_meter_run_on_the_cpu(gpu_check: ModuleType) -> None:
    run = gpu_check.run_duty_phases(
        torch, torch.device("cpu"), gpu_check.SteadySource(300.0), 0.6, matrix=64, settle_s=0.2, idle_window_s=0.5
    )
    assert list(run.phases) == ["0%", "25%", "50%", "100%"]
    for phase in run.phases.values():
        assert phase["diff_pct"] == pytest.approx(0.0, abs=1e-6)
        assert phase["counter_mean_w"] == pytest.approx(300.0)
        assert phase["sample_hz"] > 20
    assert run.phases["0%"]["achieved_duty"] == 0.0
    assert run.phases["100%"]["achieved_duty"] > 0.5
    assert gpu_check.check_counter_vs_instant(run).failures == []

    idle = gpu_check.check_idle_baseline(run)
    assert idle.metrics["idle_w"] == pytest.approx(300.0)
    assert idle.metrics["deviation_pct"] == pytest.approx(0.0, abs=1e-6)
    # A steady source has no load above idle, and the check says so.
    assert idle.failures == ["full load 300.0 W not above idle 300.0 W"]


class SleepWork:
    """A "token" that sleeps 2 ms: request threads that neither need the CPU nor fight for it."""

    token_s = 0.002

    def describe(self) -> str:
        return "a token = 2 ms asleep"

    def new_stream(self) -> None:
        return None

    def token(self, stream: None) -> None:
        time.sleep(self.token_s)


def test_request_work_runs_tokens_on_the_cpu(gpu_check: ModuleType) -> None:
    work = gpu_check.RequestWork(torch, torch.device("cpu"), size=32)
    assert work.matmuls_per_token >= 1 and work.token_s > 0
    assert work.new_stream() is None
    work.token(None)
    assert "× 32² bf16 matmuls" in work.describe()


def test_concurrent_requests_conserve_energy_and_more_tokens_get_more(gpu_check: ModuleType) -> None:
    outcome = gpu_check.check_attribution(
        torch, torch.device("cpu"), gpu_check.SteadySource(300.0), 100.0, 1.0, work=SleepWork()
    )
    assert outcome.failures == []
    assert outcome.metrics["conservation_rel_error"] <= 1e-9
    requests = {r["name"]: r for r in outcome.metrics["requests"]}
    assert requests["silent"]["reports_tokens"] is False
    assert requests["late"]["delay_s"] > 0
    assert requests["large"]["energy_j"] > requests["medium"]["energy_j"] > requests["small"]["energy_j"] > 0


def test_exit_code_and_table(gpu_check: ModuleType) -> None:
    Result = gpu_check.CheckResult
    skipped = Result("a", "gpu", "t", "skipped", "–", "NVML unavailable: x", 0.0, {})
    passed = Result("b", "cpu", "t", "passed", "fine", None, 1.0, {})
    failed = Result("c", "gpu", "t", "failed", "off", "100%: +3.00%", 2.0, {})
    assert gpu_check.exit_code([skipped, passed]) == 0
    assert gpu_check.exit_code([skipped, passed, failed]) == 1
    table = gpu_check.format_table([skipped, passed, failed])
    assert "  a (skipped): NVML unavailable: x" in table
    assert "  c (failed): 100%: +3.00%" in table


def test_train_lora_check_runs_on_the_cpu(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The GPU machine's train-lora check, run here on the CPU: it trains, the loss falls, it merges."""
    base_dir, _ = gpu_check.build_tiny_student(tmp_path)
    outcome = gpu_check.check_train_lora(base_dir, tmp_path, "cpu")
    assert outcome.failures == [], outcome.failures
    assert outcome.metrics["training"]["device"] == "cpu"
    assert outcome.metrics["merge_verification"]["passed"]
