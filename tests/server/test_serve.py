"""`student serve` refuses bad set-ups quickly and clearly, before starting anything."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support import STUDENT, free_port


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
