"""`student serve`: bad set-ups refused quickly and clearly; Ctrl-C and SIGTERM end it cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import psutil
from openai import OpenAI

from server.ledger import read_requests

from tests.support import STUDENT, Stack, free_port, http_get, post_json, start_stack, wait_for


def run_serve(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STUDENT, "serve", *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = run_serve("--model", str(tmp_path / "nope"), "--port", str(free_port()), "--vllm-port", str(free_port()))
    assert result.returncode == 1
    assert "is not a model directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_gateway_port_is_reported_before_vllm_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--model", str(tmp_path), "--port", str(port), "--vllm-port", str(free_port()))
    assert result.returncode == 1
    assert f"cannot use 127.0.0.1:{port} for the gateway" in result.stderr
    assert "[vllm]" not in result.stderr


def test_invalid_upstream_url_is_rejected() -> None:
    result = run_serve("--upstream", "localhost:8001", "--port", str(free_port()))
    assert result.returncode == 1
    assert "upstream URL must look like http://host:port" in result.stderr


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run([STUDENT, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve", "merge", "demo-model"):
        assert command in result.stdout


def test_serve_with_no_model_serves_the_demo_student_until_ctrl_c(
    demo_build: tuple[Path, list[str]], tmp_path: Path
) -> None:
    model_dir, _ = demo_build
    stack = start_stack(["--kv-cache-gib", "1"], tmp_path / "serve.log", env={"STUDENT_CACHE_DIR": str(model_dir.parent)})
    try:
        stack.wait_ready()
        assert "cache hit" in stack.log()
        status, body = http_get(f"{stack.url}/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["root"] == str(model_dir)
        status, answer = post_json(
            f"{stack.url}/v1/chat/completions",
            {
                "model": "student",
                "temperature": 0,
                "max_tokens": 120,
                "messages": [
                    {"role": "system", "content": "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."},
                    {"role": "user", "content": "Chính sách bảo hành của shop thế nào?"},
                ],
            },
        )
        reply = answer["choices"][0]["message"]["content"]
        assert status == 200 and "bảo hành" in reply and "\ufffd" not in reply, reply
        gateway_libraries = {Path(region.path).name for region in psutil.Process(stack.process.pid).memory_maps()}
        assert not any(name.startswith("libtorch") for name in gateway_libraries), "the gateway loaded torch"
        assert stack.stop(signal.SIGINT) == 130
        assert wait_for(lambda: not stack.alive_descendants(), 10), stack.alive_descendants()
    finally:
        stack.kill_all()


def test_sigterm_lets_answers_in_flight_finish_and_accounts_them(stack: Stack, tmp_path: Path) -> None:
    gateway = start_stack(["--upstream", stack.vllm_url, "--drain-timeout-s", "60"], tmp_path / "gateway.log")
    try:
        gateway.wait_ready(60)
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model="student", prompt="Xin chào", stream=True, max_tokens=2000, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [next(stream)]
        gateway.process.send_signal(signal.SIGTERM)  # mid-answer
        chunks += list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2000
        assert gateway.process.wait(60) == 0
        rows = read_requests(gateway.ledger_path)
        assert [(row.status, row.completion_tokens) for row in rows] == [(200, 2000)]
    finally:
        gateway.kill_all()
