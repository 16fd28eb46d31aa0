"""Run vLLM's OpenAI server as a child process: start, wait until healthy, forward logs, restart, stop.

vLLM spawns its own engine and worker processes. The child gets a process group of its own so
that stopping it stops all of them, and a parent-death signal so that even a SIGKILLed
`student serve` leaves no vLLM behind. A vLLM that dies after start-up (out of GPU memory, a
crashed engine) is restarted with exponential backoff (1 s, 2 s, 4 s, … up to 60 s; back to 1 s
after it ran for 5 minutes), while the gateway answers 503 with `Retry-After`.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Literal

from server.runtime.settings import Settings

LOG_PREFIX = "[vllm] "
TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_S = (1.0, 60.0)  # first wait, longest wait
STABLE_AFTER_S = 300.0  # a vLLM that ran this long starts the backoff afresh
# A vLLM that never answered /health has no answers to finish, and one stopped mid-start-up
# finishes its engine's start first (18 s of a tiny model's here): it gets this grace, not
# `vllm_stop_timeout_s`, before SIGKILL.
STARTING_STOP_GRACE_S = 3.0
State = Literal["not started", "running", "restarting", "stopping", "exited"]


class VllmStartError(RuntimeError):
    """vLLM did not become healthy; the message carries its exit code and last log lines."""


def vllm_command(settings: Settings, model_dir: Path) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for `model_dir`."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        settings.served_model_name,
        "--host",
        settings.vllm_host,
        "--port",
        str(settings.vllm_port),
        "--dtype",
        settings.dtype,
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--disable-uvicorn-access-log",
    ]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.resolved_device() == "gpu":
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    return command + list(settings.vllm_extra_args)


def vllm_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: CPU KV-cache size in GiB, unbuffered logs."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if settings.resolved_device() == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_gib:g}")
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class VllmSupervisor:
    """Owns one vLLM child process for the lifetime of `student serve`."""

    def __init__(self, settings: Settings, model_dir: Path, log_stream: IO[str] | None = None):
        self._settings = settings
        self._model_dir = model_dir
        self._log_stream = log_stream if log_stream is not None else sys.stderr
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._process: subprocess.Popen[str] | None = None
        self._log_thread: threading.Thread | None = None
        self._stopping = False
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._restart_wait_s = RESTART_BACKOFF_S[0]
        self._restarting_reason: str | None = None
        self.restarts = 0
        self._started_s = 0.0
        self._healthy = False  # the current process has answered /health
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def health_url(self) -> str:
        return f"{self._settings.upstream_base_url}/health"

    def status(self) -> tuple[State, str]:
        """A state and a plain-language reason, for `/ready` and logs."""
        if self._process is None:
            return "not started", "vLLM has not been started"
        if self._restarting_reason is not None and not self._stopping:
            return "restarting", self._restarting_reason
        code = self._process.poll()
        if code is None:
            return (
                ("stopping", "vLLM is shutting down")
                if self._stopping
                else (
                    "running",
                    f"vLLM pid {self._process.pid}",
                )
            )
        return "exited", f"vLLM exited with code {code}; last log lines:\n{self.log_tail()}"

    def log_tail(self) -> str:
        return "\n".join(self._tail)

    def start(self) -> None:
        """Launch vLLM; returns at once (see `wait_ready`)."""
        if self._process is not None:
            raise RuntimeError("vLLM already started")
        if not self._model_dir.is_dir():
            raise VllmStartError(f"model directory {self._model_dir} does not exist")
        self._launch()

    def _launch(self) -> None:
        command = vllm_command(self._settings, self._model_dir)
        self._write(f"{LOG_PREFIX}starting: {' '.join(command)}")
        self._started_s = time.monotonic()
        self._healthy = False
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=vllm_environment(self._settings),
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._log_thread = threading.Thread(
            target=self._forward_logs, args=(self._process,), name="vllm-logs", daemon=True
        )
        self._log_thread.start()

    def wait_ready(
        self, timeout_s: float | None = None, poll_s: float = 0.5, stop_requested: threading.Event | None = None
    ) -> float | None:
        """Block until vLLM answers /health; returns seconds waited. Raises VllmStartError.

        Returns None at once when `stop_requested` is set (vLLM is left to `stop`).
        """
        stop_requested = stop_requested if stop_requested is not None else threading.Event()
        if self._process is None:
            raise RuntimeError("vLLM not started")
        limit_s = self._settings.vllm_start_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        while True:
            code = self._process.poll()
            if code is not None:
                self._join_logs()
                raise VllmStartError(
                    f"vLLM exited with code {code} during start-up. Last log lines:\n{self.log_tail()}"
                )
            if _answers_health(self.health_url):
                self._healthy = True
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch, name="vllm-watch", daemon=True)
                    self._watcher.start()
                return time.monotonic() - started
            if time.monotonic() - started > limit_s:
                self.stop()
                raise VllmStartError(
                    f"vLLM did not become healthy within {limit_s:g} s (stopped it). Last log lines:\n{self.log_tail()}"
                )
            if stop_requested.wait(poll_s):
                return None

    def stop(self) -> int | None:
        """SIGTERM the whole process group, SIGKILL after the grace period; returns the exit code.

        The grace is `vllm_stop_timeout_s` seconds once vLLM has answered /health, and at most
        `STARTING_STOP_GRACE_S` while it is still starting.
        """
        with self._lock:
            self._stopping = True
            self._stop_event.set()
            process = self._process
        if process is None:
            return None
        if process.poll() is None:
            grace_s = self._settings.vllm_stop_timeout_s
            if not self._healthy:
                grace_s = min(grace_s, STARTING_STOP_GRACE_S)
            self._signal_group(signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._write(f"{LOG_PREFIX}did not stop in {grace_s:g} s, killing")
        # The engine and workers may outlive the API process: clear the whole group.
        self._signal_group(signal.SIGKILL)
        code = process.wait()
        self._join_logs()
        return code

    def __enter__(self) -> VllmSupervisor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._process is not None
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            pass

    def _forward_logs(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            self._write(LOG_PREFIX + line)

    def _watch(self) -> None:
        """Lives as long as the supervisor: restarts a vLLM that died on its own.

        Restarts are launched from this thread because a child's parent-death signal follows
        the thread that started it: one started from a short-lived thread would be killed.
        """
        while True:
            process = self._process
            assert process is not None
            code = process.wait()
            if self._stopping:
                return
            if time.monotonic() - self._started_s >= STABLE_AFTER_S:
                self._restart_wait_s = RESTART_BACKOFF_S[0]
            wait_s = self._restart_wait_s
            self._restart_wait_s = min(wait_s * 2, RESTART_BACKOFF_S[1])
            self._restarting_reason = f"vLLM exited with code {code}; restarting in {wait_s:g} s"
            self._write(
                f"{LOG_PREFIX}exited unexpectedly with code {code}; "
                f"restarting in {wait_s:g} s, requests get 503 meanwhile"
            )
            if self._stop_event.wait(wait_s):
                return
            with self._lock:
                if self._stopping:
                    return
                self.restarts += 1
                self._restarting_reason = (
                    f"vLLM is starting again after exiting with code {code} (restart {self.restarts})"
                )
                self._launch()
            self._wait_recovered(self._process)

    def _wait_recovered(self, process: subprocess.Popen[str] | None) -> None:
        """Clear the restarting state once the new vLLM answers /health (or return if it died)."""
        while not self._stop_event.is_set() and process is not None and process.poll() is None:
            if _answers_health(self.health_url):
                self._healthy = True
                self._restarting_reason = None
                self._write(f"{LOG_PREFIX}back after restart {self.restarts}")
                return
            self._stop_event.wait(1.0)

    def _join_logs(self) -> None:
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)

    def _write(self, line: str) -> None:
        try:
            print(line, file=self._log_stream, flush=True)
        except (ValueError, OSError):
            pass


def _answers_health(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
