"""`student gpu-check` on this machine: the CPU-side checks pass, the GPU ones say why they skip.

The GPU side itself runs only on a GPU machine (`python scripts/gpu_check.py` there is that run).
Here its moving parts (duty-cycle load, collector, phase comparison, idle check, concurrent
requests) run on the CPU against a steady stand-in source, so a broken loop or a wrong sum shows
before device time is spent. The device machine has no vLLM, FastAPI or uvicorn: the run here
happens with those made unimportable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from server.gpu_check import model_checks, runner
from server.gpu_check.meter_checks import (
    PhaseRun,
    RequestWork,
    check_attribution,
    check_counter_vs_instant,
    check_idle_baseline,
    compare_counter_and_instant,
    run_duty_phases,
)
from server.gpu_check.results import CheckResult
from server.telemetry.power_sources import NvmlSource, Reading, SteadySource
from tests.support import STUDENT

REPO = Path(__file__).resolve().parents[3]
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
ABSENT_ON_THE_DEVICE = ("fastapi", "uvicorn", "vllm")
# Python source that makes `modules` unimportable (as on the device machine), to put before a run.
POISON = "import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"


def _nvml_reason() -> str | None:
    """None where the real NVML starts, else its reason."""
    source = NvmlSource()
    try:
        return None if source.status == "ok" else source.reason
    finally:
        source.close()


NVML_REASON = _nvml_reason()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`student gpu-check --out ...` (the `student` program's `main`), vLLM, FastAPI and uvicorn unimportable."""
    if NVML_REASON is None:
        pytest.skip("NVML works here: run `student gpu-check` itself (minutes), not this CPU-side test")
    out = tmp_path_factory.mktemp("gpu-check") / "nested" / "gpu-check.json"
    student = POISON.format(modules=ABSENT_ON_THE_DEVICE) + "from server.runtime.cli import main\nsys.exit(main())\n"
    completed = subprocess.run(
        [sys.executable, "-c", student, "gpu-check", "--out", str(out)],
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
    model_names = ["merge_bf16_cpu", "merge_bf16_cuda", "train_lora_cuda"]
    assert names == ["trace_conservation", "sampler_cpu_standin", *NVML_CHECKS, *model_names]
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


# --- the command: imports, entry points ----------------------------------------------------


def test_the_command_loads_without_vllm_fastapi_uvicorn_or_torch() -> None:
    """What `student gpu-check --help` imports: none of the device machine's absent packages, no torch."""
    heavy = ("torch", "pynvml", "transformers", "peft")
    code = POISON.format(modules=ABSENT_ON_THE_DEVICE) + (
        "import json\n"
        "from server.gpu_check import meter_checks, model_checks, results, runner\n"
        "from server.runtime.cli import build_parser\n"
        "build_parser('gpu-check').parse_args(['gpu-check', '--skip-merge'])\n"
        f"print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == []


@pytest.mark.parametrize("arguments", [["--help"], ["--phase-seconds", "soon"]], ids=["help", "bad-argument"])
def test_student_and_the_script_are_one_command(arguments: list[str], tmp_path: Path) -> None:
    """`python scripts/gpu_check.py` from anywhere answers as `student gpu-check` does: output and exit code."""
    env = {**os.environ, "COLUMNS": "100"}
    runs = [
        subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        for command in ([STUDENT, "gpu-check", *arguments], [sys.executable, str(SCRIPT), *arguments])
    ]
    student, script = ((run.returncode, run.stdout, run.stderr) for run in runs)
    assert student == script
    code, stdout, stderr = student
    if arguments == ["--help"]:
        assert code == 0 and stdout.startswith("usage: student gpu-check")
        assert "--phase-seconds" in stdout and "--skip-merge" in stdout
    else:
        assert code == 2 and "argument --phase-seconds: invalid float value: 'soon'" in stderr


def test_student_lists_the_command() -> None:
    completed = subprocess.run([STUDENT, "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "gpu-check" in completed.stdout


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


def phase_run(scales: dict[str, float]) -> Any:
    phases = {}
    for name, scale in scales.items():
        compared = compare_counter_and_instant(square_wave_readings(scale))
        phases[name] = {"duty": 0.0, "achieved_duty": 0.0, **compared}
    return PhaseRun(phases, None, 0.0, None, None, {}, 5.0)


def test_counter_and_instant_agree_on_an_exact_trace() -> None:
    result = compare_counter_and_instant(square_wave_readings())
    assert result["diff_pct"] == pytest.approx(0.0, abs=1e-9)
    assert result["counter_mean_w"] == pytest.approx(250.0, rel=0.01)
    assert result["sample_hz"] == pytest.approx(40.0)
    assert result["instant"]["updates"] == 40  # a new level every quarter second
    assert result["instant"]["median_update_interval_ms"] == pytest.approx(250.0)
    assert result["counter"]["updates"] == 400
    assert result["counter_resets"] == 0


def test_a_counter_3_percent_high_fails_the_2_percent_check() -> None:
    passing = check_counter_vs_instant(phase_run({"0%": 1.0, "100%": 1.015}))
    assert passing.failures == []
    failing = check_counter_vs_instant(phase_run({"0%": 1.0, "100%": 1.03}))
    assert len(failing.failures) == 1
    assert failing.failures[0].startswith("100%: instant power integrates to -2.91% of the counter")


def test_duty_phases_collector_and_idle_meter_run_on_the_cpu() -> None:
    run = run_duty_phases(
        torch, torch.device("cpu"), SteadySource(300.0), 0.6, matrix=64, settle_s=0.2, idle_window_s=0.5
    )
    assert list(run.phases) == ["0%", "25%", "50%", "100%"]
    for phase in run.phases.values():
        assert phase["diff_pct"] == pytest.approx(0.0, abs=1e-6)
        assert phase["counter_mean_w"] == pytest.approx(300.0)
        assert phase["sample_hz"] > 20
    assert run.phases["0%"]["achieved_duty"] == 0.0
    assert run.phases["100%"]["achieved_duty"] > 0.5
    assert check_counter_vs_instant(run).failures == []

    idle = check_idle_baseline(run)
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


def test_request_work_runs_tokens_on_the_cpu() -> None:
    work = RequestWork(torch, torch.device("cpu"), size=32)
    assert work.matmuls_per_token >= 1 and work.token_s > 0
    assert work.new_stream() is None
    work.token(None)
    assert "× 32² bf16 matmuls" in work.describe()


def test_concurrent_requests_conserve_energy_and_more_tokens_get_more() -> None:
    outcome = check_attribution(torch, torch.device("cpu"), SteadySource(300.0), 100.0, 1.0, work=SleepWork())
    assert outcome.failures == []
    assert outcome.metrics["conservation_rel_error"] <= 1e-9
    requests = {r["name"]: r for r in outcome.metrics["requests"]}
    assert requests["silent"]["reports_tokens"] is False
    assert requests["late"]["delay_s"] > 0
    assert requests["large"]["energy_j"] > requests["medium"]["energy_j"] > requests["small"]["energy_j"] > 0


def test_exit_code_and_table() -> None:
    skipped = CheckResult("a", "gpu", "t", "skipped", "–", "NVML unavailable: x", 0.0, {})
    passed = CheckResult("b", "cpu", "t", "passed", "fine", None, 1.0, {})
    failed = CheckResult("c", "gpu", "t", "failed", "off", "100%: +3.00%", 2.0, {})
    assert runner.exit_code([skipped, passed]) == 0
    assert runner.exit_code([skipped, passed, failed]) == 1
    table = runner.format_table([skipped, passed, failed])
    assert "  a (skipped): NVML unavailable: x" in table
    assert "  c (failed): 100%: +3.00%" in table


@pytest.mark.e2e
def test_train_lora_check_runs_on_the_cpu(tmp_path: Path) -> None:
    """The GPU machine's train-lora check, run here on the CPU: it trains, the loss falls, it merges."""
    base_dir, _ = model_checks.build_tiny_student(tmp_path)
    outcome = model_checks.check_train_lora(base_dir, tmp_path, "cpu")
    assert outcome.failures == [], outcome.failures
    assert outcome.metrics["training"]["device"] == "cpu"
    assert outcome.metrics["merge_verification"]["passed"]
