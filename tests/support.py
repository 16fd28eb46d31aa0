"""Helpers for tests that run the real stack: ports, processes, vLLM's own metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from server.runtime.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT = str(Path(sys.executable).with_name("student"))


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: dict, timeout_s: float = 120.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def open_raw_request(port: int, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket, so the test decides exactly when the client vanishes."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_headers(sock: socket.socket) -> bytes:
    """The response's status line and headers (the gateway sends them when vLLM does)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the headers: {received!r}"
        received += chunk
    return received


def metric_samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` in the Prometheus text at `url`/metrics, with its labels."""
    _, text = http_get(f"{url}/metrics")
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == name
    ]


def vllm_gauge(vllm_url: str, name: str) -> float:
    """Sum of a vLLM Prometheus gauge, e.g. `vllm:num_requests_running`."""
    values = [value for _, value in metric_samples(vllm_url, name)]
    if not values:
        raise AssertionError(f"{name} not in vLLM metrics")
    return sum(values)


def gateway_stats(url: str, window_s: float | None = None) -> dict[str, Any]:
    """The gateway's /stats document (for the last `window_s` seconds, or since start)."""
    status, body = http_get(f"{url}/stats" + ("" if window_s is None else f"?window={window_s}"))
    assert status == 200, body
    return json.loads(body)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout_s` passes; returns its last verdict."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


@dataclass
class Stack:
    """A `student serve` process started by a test, with its ports and log."""

    process: subprocess.Popen
    log_path: Path
    port: int
    vllm_port: int
    ledger_path: Path
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 420.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"student serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if not _listening(self.port):
                return False
            try:  # /ready waits up to 2 s on vLLM's /health, longer on a busy box: not ready yet
                return http_get(f"{self.url}/ready", timeout_s=10)[0] == 200
            except (TimeoutError, OSError):
                return False

        if not wait_for(ready, timeout_s, interval_s=0.5):
            raise AssertionError(f"stack not ready in {timeout_s} s:\n{self.log()[-4000:]}")
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def vllm_api_server(self) -> psutil.Process:
        """The vLLM child `student serve` started (its API server, leader of vLLM's process group).

        Found by parentage, not by the lowest pid: pids wrap around (at 32,768 here), and a
        busy test run gets there.
        """
        children = psutil.Process(self.process.pid).children()
        servers = [child for child in children if "vllm.entrypoints" in " ".join(child.cmdline())]
        if len(servers) != 1:
            raise AssertionError(f"expected one vLLM child of student serve, found {servers}")
        return servers[0]

    def vllm_engine(self) -> psutil.Process:
        """vLLM's engine-core process: suspending it stops every token (and every abort taking
        effect) while its API server keeps answering, so a test can act on a request that would
        otherwise finish first on a fast box."""
        return engine_core(self.alive_descendants())

    @contextmanager
    def engine_paused(self) -> Iterator[None]:
        """SIGSTOP vLLM's engine while the block runs: its HTTP server still takes requests, but
        no token comes and nothing finishes (a hung GPU, or a box too fast for the test to act)."""
        engine = self.vllm_engine()
        engine.suspend()
        try:
            yield
        finally:
            engine.resume()

    def step_engine_until(self, condition: Callable[[], bool], step_s: float = 0.2, timeout_s: float = 120.0) -> bool:
        """Inside `engine_paused()`: let the engine run `step_s` at a time until `condition` holds
        while it is stopped; False if it never does within `timeout_s`.

        On two cores vLLM's API server can fall far behind a running engine: a fresh-clone run
        and runs here saw a stream's first event, and the gauges, arrive only once a
        16,384-token answer had ended. While the engine is stopped the API server catches up,
        so `condition` (a stream's events, a gauge) is read then, and is still true when read.
        """
        engine = self.vllm_engine()
        deadline = time.monotonic() + timeout_s
        while True:
            run_for(engine, step_s)
            if wait_for(condition, 2.0):
                return True
            if time.monotonic() > deadline:
                return False

    def alive_descendants(self) -> list[psutil.Process]:
        alive = []
        for proc in self.descendants:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_all(self) -> None:
        for proc in [*self.alive_descendants()]:
            proc.kill()
        if self.process.poll() is None:
            self.process.kill()


def run_for(process: psutil.Process, seconds: float) -> None:
    """SIGCONT a stopped `process`, and SIGSTOP it again `seconds` later.

    Timed by a real-time (SCHED_FIFO) shell where allowed (root, as in CI): while vLLM's engine
    runs on two cores, a plain process here was measured to wake from a 10 ms sleep up to 50 s
    late, so a step timed by this test could let a 16k-token answer run to its end.
    """
    step = f"kill -CONT {process.pid}; sleep {seconds}; kill -STOP {process.pid}"
    if shutil.which("chrt"):
        timed = subprocess.run(["chrt", "-f", "10", "sh", "-c", step], stderr=subprocess.DEVNULL)
        if timed.returncode == 0:
            return
    process.resume()
    time.sleep(seconds)
    process.suspend()


def engine_core(processes: list[psutil.Process]) -> psutil.Process:
    """vLLM's engine-core process among `processes` (by its name or command line)."""
    return next(proc for proc in processes if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()))


def start_stack(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Stack:
    """Start `student serve ARGS` on free ports; call `wait_ready()` before use.

    Its ledger is `ledger.sqlite3` beside the log unless `env` names another.
    """
    port, vllm_port = free_port(), free_port()
    ledger_path = log_path.parent / "ledger.sqlite3"
    with log_path.open("w") as log:  # the child keeps it open; this process need not
        process = subprocess.Popen(
            [STUDENT, "serve", "--port", str(port), "--vllm-port", str(vllm_port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "STUDENT_LEDGER_PATH": str(ledger_path), **(env or {})},
        )
    return Stack(process, log_path, port, vllm_port, ledger_path)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running_stack(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 60.0
) -> Iterator[Stack]:
    """`start_stack`, wait until ready (gateway-only stacks: seconds; with vLLM pass minutes), and
    afterwards stop it and kill whatever of its process tree is left."""
    stack = start_stack(args, log_path, env)
    try:
        stack.wait_ready(ready_timeout_s)
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            stack.kill_all()


VLLM_READY_TIMEOUT_S = 420.0


@contextmanager
def uvicorn_in_thread(app: Any, port: int, **config: Any) -> Iterator[uvicorn.Server]:
    """An ASGI app served by a real uvicorn on 127.0.0.1:`port` in a daemon thread, stopped afterwards."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 30, interval_s=0.01), "the in-process server did not start"
        yield server
    finally:
        server.should_exit = True
        thread.join(30)
