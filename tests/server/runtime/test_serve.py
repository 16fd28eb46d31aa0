"""`student serve`: bad set-ups refused quickly and clearly; Ctrl-C and SIGTERM end it cleanly."""

from __future__ import annotations

import gc
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from models.demo import is_complete, read_build_info
from server.accounting.ledger import read_requests
from tests.conftest import STACK_ARGS
from tests.support import (
    STUDENT,
    Stack,
    free_port,
    http_get,
    open_raw_request,
    read_headers,
    start_stack,
    wait_for,
)

# (signal, the exit code it must give whenever it lands)
STOPS = [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 0, id="sigterm")]


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


def test_serve_help_states_the_exit_codes() -> None:
    result = subprocess.run([STUDENT, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "0 stopped by SIGTERM" in text and "130 stopped by Ctrl-C" in text and "1 could not start" in text


def log_shows(stack: Stack, text: str, timeout_s: float) -> None:
    """Wait until `text` is in the stack's log (the observable moment a test acts on)."""
    if not wait_for(lambda: text in stack.log() or stack.process.poll() is not None, timeout_s):
        raise AssertionError(f"{text!r} not in the log after {timeout_s} s:\n{stack.log()[-3000:]}")
    assert stack.process.poll() is None, f"student serve exited early:\n{stack.log()[-3000:]}"


def process_tree(stack: Stack) -> list[psutil.Process]:
    return psutil.Process(stack.process.pid).children(recursive=True)


def all_gone(processes: list[psutil.Process]) -> bool:
    def gone(proc: psutil.Process) -> bool:
        try:
            return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(gone(proc) for proc in processes)


def stop_demo_build(sig: signal.Signals, code: int, cache: Path, moment: str, log_path: Path) -> None:
    """Start `student serve` without a model on `cache`, stop it once `moment` is in the log."""
    stack = start_stack([], log_path, env={"STUDENT_CACHE_DIR": str(cache)})
    try:
        log_shows(stack, moment, 300)
        builders = process_tree(stack)
        assert builders, "no demo-model child"
        assert stack.stop(sig) == code, stack.log()[-3000:]
        assert wait_for(lambda: all_gone(builders), 60), builders
        assert "start-up abandoned" in stack.log() and "[vllm]" not in stack.log()
    finally:
        stack.kill_all()


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code", STOPS)
def test_a_stop_while_the_base_is_converted_leaves_nothing_half_written(
    sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    stop_demo_build(sig, code, cache, "reading SmolLM2-135M-Instruct", tmp_path / "serve.log")
    assert [path.name for path in cache.iterdir()] == [], "a half-converted base was left in the cache"


@pytest.mark.parametrize("sig, code", STOPS)
def test_a_stop_while_the_demo_student_is_merged_leaves_nothing_half_written(
    sig: signal.Signals, code: int, smollm2_base: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / smollm2_base.name).symlink_to(smollm2_base)  # the converted base: a cache hit
    stop_demo_build(sig, code, cache, "building the demo student", tmp_path / "serve.log")
    left = sorted(path.name for path in cache.iterdir() if path.name != smollm2_base.name)
    assert not [name for name in left if name.startswith(".")], f"a staging directory was left: {left}"
    # The merge takes seconds: the signal may land after it finished, never half-way.
    assert all(is_complete(cache / name, read_build_info(cache / name)["cache_key"]) for name in left), left


@pytest.mark.parametrize("sig, code", STOPS)
@pytest.mark.parametrize(
    "moment", ["[vllm] starting:", "Initializing a V1 LLM engine"], ids=["launched", "engine-loading"]
)
def test_a_stop_while_vllm_starts_stops_it(
    sig: signal.Signals, code: int, moment: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    stack = start_stack(["--model", str(tiny_model_dir), *STACK_ARGS], tmp_path / "serve.log")
    try:
        log_shows(stack, moment, 120)
        assert wait_for(lambda: bool(process_tree(stack)), 30)
        vllm = process_tree(stack)
        assert stack.stop(sig) == code, stack.log()[-3000:]
        assert "vLLM ready" not in stack.log() and "start-up abandoned" in stack.log()
        # A vLLM that never answered /health gets the short grace, not STUDENT_VLLM_STOP_TIMEOUT_S.
        assert "did not stop in 20 s" not in stack.log()
        assert wait_for(lambda: all_gone(vllm), 30), vllm
    finally:
        stack.kill_all()


@pytest.mark.parametrize("sig, code", STOPS)
def test_a_stop_while_serving_exits_with_its_code(sig: signal.Signals, code: int, stack: Stack, tmp_path: Path) -> None:
    gateway = start_stack(["--upstream", stack.vllm_url], tmp_path / "gateway.log")
    try:
        gateway.wait_ready(60)
        assert http_get(f"{gateway.url}/v1/models")[0] == 200
        assert gateway.stop(sig) == code, gateway.log()[-3000:]
        assert f"{sig.name} received: stopping (exit code {code})" in gateway.log()
    finally:
        gateway.kill_all()


@pytest.mark.parametrize("first, code", STOPS)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["then-sigterm", "then-ctrl-c"])
def test_a_signal_during_the_drain_keeps_the_first_signals_exit_code(
    first: signal.Signals, code: int, second: signal.Signals, stack: Stack, tmp_path: Path
) -> None:
    """While answers drain, SIGTERM again changes nothing; Ctrl-C cancels them (recorded as cut)."""
    gateway = start_stack(["--upstream", stack.vllm_url, "--drain-timeout-s", "120"], tmp_path / "gateway.log")
    try:
        gateway.wait_ready(60)
        body = {"model": "student", "prompt": "Xin chào", "max_tokens": 64, "ignore_eos": True, "stream": True}
        with stack.engine_paused():  # the answer cannot finish before the test has acted
            sock = open_raw_request(gateway.port, "/v1/completions", body)
            read_headers(sock)
            gateway.process.send_signal(first)
            log_shows(gateway, "Waiting for connections to close", 60)
            gateway.process.send_signal(second)
            if second == signal.SIGINT:
                gateway.process.wait(60)  # with vLLM still frozen: nothing left to wait for
        assert gateway.stop(second, timeout_s=120) == code, gateway.log()[-3000:]
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        rows = read_requests(gateway.ledger_path)
        if second == signal.SIGINT:
            assert "cancelling the answers still in flight" in gateway.log()
            assert [row.status for row in rows] == [499]
        else:
            assert "SIGTERM received: already stopping" in gateway.log()
            assert received.count(b"data: ") >= 64 and b"data: [DONE]" in received, received[-500:]
            assert [(row.status, row.completion_tokens) for row in rows] == [(200, 64)]
    finally:
        gateway.kill_all()


def test_sigterm_lets_answers_in_flight_finish_and_accounts_them(stack: Stack, tmp_path: Path) -> None:
    gateway = start_stack(["--upstream", stack.vllm_url, "--drain-timeout-s", "60"], tmp_path / "gateway.log")
    try:
        gateway.wait_ready(60)
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model="student",
            prompt="Xin chào",
            stream=True,
            max_tokens=2000,
            stream_options={"include_usage": True},
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


def test_the_process_starting_serve_closes_its_handle_on_the_log(tmp_path: Path) -> None:
    """The child writes the log; the parent's handle was left for the garbage collector to close
    (an unclosed-file ResourceWarning per started stack)."""
    log = tmp_path / "serve.log"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        stack = start_stack(["--upstream", "localhost:8001"], log)  # refused at once: exit 1
        gc.collect()
    try:
        assert not [w for w in caught if issubclass(w.category, ResourceWarning) and str(log) in str(w.message)]
        assert str(log) not in [entry.path for entry in psutil.Process().open_files()]
        assert stack.process.wait(60) == 1
    finally:
        stack.kill_all()


def test_a_load_test_master_closes_its_handles_on_the_workers_logs(tmp_path: Path) -> None:
    """The same for `student load --workers N`: checked in a child, since Locust patches with gevent."""
    code = (
        "import gc, sys, warnings; from pathlib import Path; from loadtest.engine import _start_worker; "
        "warnings.simplefilter('error', ResourceWarning); log = Path(sys.argv[1]); "
        "worker = _start_worker(1, log); gc.collect(); worker.kill(); worker.wait(); print('closed')"
    )
    command = [sys.executable, "-X", "dev", "-c", code, str(tmp_path / "worker.log")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "closed", result.stderr
    assert "ResourceWarning" not in result.stderr, result.stderr
