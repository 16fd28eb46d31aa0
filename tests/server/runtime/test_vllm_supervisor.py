"""The vLLM child's life: start-up failure reported, crash survived, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from server.runtime.settings import Settings
from server.runtime.vllm_supervisor import VllmStartError, VllmSupervisor, vllm_command, vllm_environment
from tests.conftest import STACK_ARGS
from tests.support import free_port, http_get, post_json, start_stack, wait_for


def test_command_carries_the_settings(tmp_path: Path) -> None:
    settings = Settings(vllm_port=9101, served_model_name="shop", max_model_len=512, device="cpu")
    command = vllm_command(settings, tmp_path)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--model") + 1] == str(tmp_path)
    assert command[command.index("--port") + 1] == "9101"
    assert command[command.index("--served-model-name") + 1] == "shop"
    assert command[command.index("--max-model-len") + 1] == "512"
    assert "--gpu-memory-utilization" not in command


def test_context_length_is_the_models_own_unless_set(tmp_path: Path) -> None:
    assert "--max-model-len" not in vllm_command(Settings(), tmp_path)


def test_gpu_settings_use_gpu_memory_not_cpu_kv_cache(tmp_path: Path) -> None:
    settings = Settings(device="gpu", gpu_memory_utilization=0.8)
    command = vllm_command(settings, tmp_path)
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_environment(settings, base={})
    assert vllm_environment(Settings(device="cpu", kv_cache_gib=3), base={})["VLLM_CPU_KVCACHE_SPACE"] == "3"


def broken_model(tiny_model_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_model_dir, target)
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    return target


def test_start_failure_reports_exit_code_and_log_tail(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(vllm_port=free_port(), max_model_len=1024, kv_cache_gib=1, vllm_start_timeout_s=300)
    supervisor = VllmSupervisor(
        settings, broken_model(tiny_model_dir, tmp_path / "broken"), log_stream=open(os.devnull, "w")
    )
    supervisor.start()
    pid = supervisor.pid
    with pytest.raises(VllmStartError) as failure:
        supervisor.wait_ready()
    supervisor.stop()
    message = str(failure.value)
    assert "vLLM exited with code" in message and "during start-up" in message
    assert "Last log lines:" in message and len(message.splitlines()) > 3
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not _processes_in_group(pid)


def _processes_in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def test_sigterm_to_serve_leaves_no_vllm_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    # No --max-model-len on purpose, so vLLM takes the model's own (4096). Not eager: the one test
    # that starts vLLM with torch.compile, as `student serve` does by default, and stops it with
    # its compile workers.
    args = ["--model", str(tiny_model_dir), "--kv-cache-gib", "1"]
    stack = start_stack(args, tmp_path / "serve.log")
    try:
        stack.wait_ready()
        assert len(stack.descendants) >= 2, "expected vLLM's API server and engine processes"
        assert stack.stop(signal.SIGTERM) == 0
        assert wait_for(lambda: not stack.alive_descendants(), 10), stack.alive_descendants()
        assert "stopping vLLM" in stack.log()
    finally:
        stack.kill_all()


def unsupported_model(tiny_model_dir: Path, target: Path) -> Path:
    """An architecture vLLM does not know: its API server refuses it before starting an engine."""
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    return target


def test_startup_failure_through_serve_exits_with_the_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(
        ["--model", str(unsupported_model(tiny_model_dir, tmp_path / "unsupported")), *STACK_ARGS], tmp_path / "log"
    )
    try:
        assert stack.process.wait(300) == 1
        log = stack.log()
        assert "student serve: vLLM exited with code" in log and "Last log lines:" in log
        error = log[log.index("student serve: vLLM exited with code") :]
        assert "NoSuchModelForCausalLM" in error, error[-3000:]
    finally:
        stack.kill_all()


def test_gateway_survives_a_vllm_crash_and_vllm_comes_back_by_itself(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(["--model", str(tiny_model_dir), *STACK_ARGS], tmp_path / "serve.log")
    try:
        stack.wait_ready()
        api_server = stack.vllm_api_server()
        os.killpg(api_server.pid, signal.SIGKILL)
        assert wait_for(lambda: "vLLM exited" in http_get(f"{stack.url}/ready")[1].decode(), 10)
        status, body = http_get(f"{stack.url}/ready")
        assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable"
        assert wait_for(lambda: "exited unexpectedly with code -9; restarting in 1 s" in stack.log(), 5)
        assert http_get(f"{stack.url}/health")[0] == 200
        status, answer = post_json(f"{stack.url}/v1/completions", {"model": "student", "prompt": "hi", "max_tokens": 2})
        assert status == 503 and answer["error"]["type"] == "service_unavailable"

        assert wait_for(lambda: http_get(f"{stack.url}/ready")[0] == 200, 300, interval_s=1.0), stack.log()[-3000:]
        body = {"model": "student", "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        status, answer = post_json(f"{stack.url}/v1/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
        assert wait_for(lambda: "back after restart 1" in stack.log(), 5)  # the watcher polls /health each second
        assert stack.stop() == 0
    finally:
        stack.kill_all()
