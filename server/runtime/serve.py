"""`student serve`: start vLLM (or front one), wait for it, then run the gateway until stopped.

The vLLM child outlives every request and must die with this process, whatever stops it:
Ctrl-C, SIGTERM, a start-up failure or a port clash. So the supervisor wraps the whole run
here, around uvicorn, rather than living inside the app's lifespan.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from server.control.auth import KeyFileError, load_keys
from server.gateway.app import create_app
from server.runtime.profiles import profile_settings
from server.runtime.serve_flags import add_setting_flags, flag_overrides
from server.runtime.settings import Settings
from server.runtime.stop_signals import EXIT_CODES_HELP, GatewayServer, StopSignals
from server.runtime.vllm_supervisor import VllmStartError, VllmSupervisor

DEMO_STOP_TIMEOUT_S = 30.0  # an interrupted demo build cleans up, then is killed


class ServeError(Exception):
    """A problem the user can fix (bad flag, busy port, missing model): printed, exit 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    add_setting_flags(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then the profile (if any), then `STUDENT_*` variables, then the flags passed."""
    overrides = flag_overrides(args)
    try:
        settings = Settings(**overrides)
        if settings.profile is None:
            return settings
        chosen = settings.model_fields_set
        filled = {k: v for k, v in profile_settings(settings.profile).items() if k not in chosen}
        return Settings(**filled, **overrides)
    except KeyError as exc:
        raise ServeError(exc.args[0]) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ServeError(f"invalid settings: {problems}") from None


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        return serve(settings)
    except ServeError as exc:
        print(f"student serve: {exc}", file=sys.stderr)
        return 1


def serve(settings: Settings) -> int:
    """Run until stopped; returns the process exit code (see `server.runtime.stop_signals`)."""
    _log_to_stderr()
    supervisor = None
    with StopSignals() as stop:
        _check_before_start(settings)
        if stop.requested.is_set():
            return _stopped(stop)
        try:
            if settings.manages_vllm:
                model_dir = _model_dir(settings, stop.requested)
                if model_dir is None:
                    return _stopped(stop)
                supervisor = VllmSupervisor(settings, model_dir)
                supervisor.start()
                waited_s = supervisor.wait_ready(stop_requested=stop.requested)
                if waited_s is None:
                    return _stopped(stop)
                _say(f"vLLM ready in {waited_s:.1f} s at {settings.upstream_base_url}")
            else:
                _say(f"fronting {len(settings.upstream_urls)} vLLM replica(s): {', '.join(settings.upstream_urls)}")
            if settings.has_remote:
                _say(_describe_routing(settings))
            _print_usage(settings)
            server = GatewayServer(_uvicorn_config(settings, supervisor))
            stop.attach(server)
            server.run()
            if stop.exit_code is not None:
                return stop.exit_code
            return 0 if server.started else 1
        except VllmStartError as exc:
            if stop.exit_code is not None:  # stopping vLLM mid-start-up can look like a failed start
                return _stopped(stop)
            print(f"student serve: {exc}", file=sys.stderr)
            return 1
        finally:
            if supervisor is not None:
                _say("stopping vLLM")
                supervisor.stop()


def _check_before_start(settings: Settings) -> None:
    """What can be refused in a second is refused before vLLM spends a minute starting."""
    try:
        keys = load_keys(settings.api_keys, settings.api_keys_file)
    except KeyFileError as exc:
        raise ServeError(str(exc)) from None
    if keys:
        _say(f"API keys required on /v1/* ({len(keys)} key(s): {', '.join(sorted(keys.values()))})")
    _require_free_port(settings.host, settings.port, "gateway")
    if settings.manages_vllm:
        _require_free_port(settings.vllm_host, settings.vllm_port, "vLLM")


def _stopped(stop: StopSignals) -> int:
    _say("start-up abandoned")
    assert stop.exit_code is not None
    return stop.exit_code


def _uvicorn_config(settings: Settings, supervisor: VllmSupervisor | None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, supervisor),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),  # uvicorn takes whole seconds
        log_level="info",
    )


def _model_dir(settings: Settings, stop_requested: threading.Event) -> Path | None:
    """The model to serve; None when a stop signal came while the demo student was built."""
    if settings.model_dir is None:
        _say(f"no --model given: using the demo student (cache {settings.cache_dir})")
        return _demo_student(settings.cache_dir, stop_requested)
    model_dir = settings.model_dir.expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir} is not a model directory (no config.json); pass a merged student")
    return model_dir


def _demo_student(cache_dir: Path, stop_requested: threading.Event) -> Path | None:
    """Build or reuse the demo student in a child process, so the gateway never loads torch.

    A stop signal interrupts the child like Ctrl-C (it removes its half-built staging directory)
    and returns None.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "server.runtime.cli", "demo-model"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "STUDENT_CACHE_DIR": str(cache_dir)},
        start_new_session=True,  # a terminal's Ctrl-C reaches it once, forwarded from here
    )
    while child.poll() is None:
        if stop_requested.wait(0.2):
            child.send_signal(signal.SIGINT)
            try:
                child.wait(DEMO_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return None
    assert child.stdout is not None
    out = child.stdout.read()
    if child.returncode != 0:
        raise ServeError(f"could not build the demo student (student demo-model exited {child.returncode})")
    return Path(out.strip().splitlines()[-1])


def _require_free_port(host: str, port: int, role: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot use {host}:{port} for the {role}: {exc.strerror}") from None


def _print_usage(settings: Settings) -> None:
    url = f"http://{settings.host}:{settings.port}/v1"
    _say(
        f"gateway starting. OpenAI-compatible API: {url} (model '{settings.served_model_name}')\n"
        f"  try: curl -N {url}/chat/completions -H 'Content-Type: application/json' -d "
        f'\'{{"model": "{settings.served_model_name}", "stream": true, '
        f'"messages": [{{"role": "user", "content": "Đơn hàng của tôi đang ở đâu?"}}]}}\'\n'
        f'  or:  OpenAI(base_url="{url}", api_key="unused")   health: /health  ready: /ready\n'
        f"  measured: http://{settings.host}:{settings.port}/dashboard  /stats  /metrics   "
        f"ledger: {settings.ledger_path} (student report)"
    )


def _describe_routing(settings: Settings) -> str:
    """One line on hybrid routing, naming where the key comes from, never the key."""
    price = settings.remote_api_price
    if price is None:
        raise ValueError("hybrid routing is described only when a remote is set")
    rules = settings.routing_rules
    key = f"key from ${settings.remote_api_key_env}" if settings.remote_api_key_env else "no key"
    keywords = ", ".join(rules.keywords) or "none"
    fallback = "on" if rules.fallback else "off"
    return (
        f"hybrid routing: remote {settings.remote_url} model '{settings.remote_model}' ({key}; "
        f"${price.input_usd_per_mtok:g}/${price.output_usd_per_mtok:g} per 1M tokens in/out); "
        f"{rules.header}: local|remote, models {sorted(rules.remote_models)}, keywords: {keywords}; "
        f"fallback to remote: {fallback}"
    )


def _log_to_stderr() -> None:
    """The gateway's own loggers (`server.*`) print like `_say` does; uvicorn keeps its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[student] %(message)s"))
    package_logger = logging.getLogger("server")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


def _say(message: str) -> None:
    print(f"[student] {message}", file=sys.stderr, flush=True)
