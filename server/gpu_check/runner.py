"""`student gpu-check`: the energy meter (NVML) and `student merge`/`train-lora` on a real NVIDIA GPU.

    student gpu-check --out gpu-check.json              # where the project is installed
    python scripts/gpu_check.py --out gpu-check.json    # on the bare device machine (no install)

About 3-4 minutes on one GPU, under a minute on a CPU-only machine. Needs PyTorch, transformers,
peft, tokenizers, safetensors and nvidia-ml-py (imported as `pynvml`); not vLLM, FastAPI, uvicorn
or a network. From the project it imports only `server.gpu_check`, `server.commands`,
`server.telemetry.power_sources`, `server.telemetry.energy_attribution`,
`server.telemetry.thread_cpu` and `models.*` (a test imports it with vLLM, FastAPI and uvicorn
made unimportable).

Every check ends `passed`, `failed`, `skipped` (with the reason: no NVML, no CUDA) or `error`
(with the traceback's last line). A check that cannot run on this machine is skipped, never
estimated. The run prints a table and writes every number to `--out` (JSON); it exits 0 when
every check that ran passed and 1 otherwise.

The checks: `meter_checks` (the meter's arithmetic on replayed traces, the sampler's CPU, NVML,
the duty-cycle load, attribution under concurrent requests) and `model_checks` (merge and
train-lora on the CPU and on CUDA); `results` holds what a check returns and how one runs. Each
check and how to read its failure: docs/gpu-validation.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from server.commands import COMMANDS
from server.gpu_check import meter_checks, model_checks
from server.gpu_check.results import CheckResult, elapsed_s, say

FORMAT = "gpu-check/1"

# --- machine ------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """This machine for the JSON: host, CPU, PyTorch and its CUDA, and the versions that matter."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    for package in ("transformers", "peft", "tokenizers", "safetensors", "nvidia-ml-py", "numpy"):
        info[package] = _version(package)
    return info


# --- the run ------------------------------------------------------------------------------


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when every check that ran passed, 1 when any failed or broke."""
    return 1 if any(r.status in ("failed", "error") for r in results) else 0


def format_table(results: Sequence[CheckResult]) -> str:
    """One row per check, then the reason of each that did not pass (or passed with a note)."""
    headers = ("check", "part", "status", "time s", "result")
    rows = [(r.name, r.part, r.status, f"{r.elapsed_s:.1f}", r.summary) for r in results]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in rows]
    notes = [f"  {r.name} ({r.status}): {r.reason}" for r in results if r.reason]
    if notes:
        out += ["", "reasons:", *notes]
    return "\n".join(out)


def guarded(name: str, checks: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """A group of checks; should the group itself break, one `error` entry says how."""
    try:
        return checks()
    except Exception as error:
        say(f"{name}: broke: {type(error).__name__}: {error}")
        return [
            CheckResult(
                name,
                "gpu",
                "the group of checks itself",
                "error",
                "–",
                f"{type(error).__name__}: {error}",
                0.0,
                {"traceback": traceback.format_exc(limit=-3)},
            )
        ]


# --- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="JSON result (default: %(default)s)")
    parser.add_argument(
        "--phase-seconds", type=float, default=15.0, help="seconds per duty-cycle phase (default: %(default)s)"
    )
    parser.add_argument(
        "--attribution-seconds",
        type=float,
        default=12.0,
        help="about how long the synthetic requests keep the GPU busy (default: %(default)s)",
    )
    parser.add_argument("--skip-merge", action="store_true", help="leave out the merge and train-lora checks")


def run(args: argparse.Namespace) -> int:
    """Every check, the table on stdout and the JSON at `args.out`; 0 when every check that ran passed."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    say("machine: probing PyTorch and CUDA")
    machine = machine_info()
    say(f"machine: {machine['cpu']} × {machine['cpu_count']}, torch {machine['torch']}, GPU {machine['gpu']}")
    results = meter_checks.cpu_checks()
    results += guarded("gpu_checks", lambda: meter_checks.gpu_checks(args.phase_seconds, args.attribution_seconds))
    if not args.skip_merge:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
            results += guarded("merge_checks", lambda: model_checks.merge_checks(Path(workdir)))

    code = exit_code(results)
    report = build_report(args, started_at, machine, results, code)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    counts = report["counts"]
    print(format_table(results))
    print(
        f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, {counts['error']} error "
        f"in {report['elapsed_s']:.0f} s; JSON: {args.out}; exit {code}"
    )
    return code


def build_report(
    args: argparse.Namespace, started_at: str, machine: dict[str, Any], results: Sequence[CheckResult], code: int
) -> dict[str, Any]:
    """The JSON document: the machine, thresholds, settings and every check with its numbers."""
    m = meter_checks
    return {
        "format": FORMAT,
        "script": "student gpu-check",
        "started_at": started_at,
        "elapsed_s": elapsed_s(),
        "passed": code == 0,
        "exit_code": code,
        "counts": {s: sum(1 for r in results if r.status == s) for s in ("passed", "failed", "skipped", "error")},
        "machine": machine,
        "gpu": next((r.metrics for r in results if r.name == "gpu_info" and r.metrics), None),
        "thresholds": {
            "counter_vs_instant_max_pct": m.COUNTER_VS_INSTANT_MAX_PCT,
            "idle_max_deviation_pct": m.IDLE_MAX_DEVIATION_PCT,
            "sampler_max_core_pct": m.SAMPLER_MAX_CORE_PCT,
            "nvml_read_max_us": m.NVML_READ_MAX_US,
            "conservation_rel": m.CONSERVATION_REL,
        },
        "settings": {
            "phase_seconds": args.phase_seconds,
            "attribution_seconds": args.attribution_seconds,
            "duty_cycles": m.DUTY_CYCLES,
            "duty_period_s": m.DUTY_PERIOD_S,
            "settle_s": m.SETTLE_S,
            "idle_window_s": m.IDLE_WINDOW_S,
            "sampler_hz": m.SAMPLER_HZ,
            "collector_hz": m.COLLECTOR_HZ,
        },
        "checks": [asdict(r) for r in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`student gpu-check` without the `student` program (`python -m server.gpu_check.runner`)."""
    parser = argparse.ArgumentParser(prog="student gpu-check", description=COMMANDS["gpu-check"][1])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
