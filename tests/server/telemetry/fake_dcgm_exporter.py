"""A stand-in for NVIDIA's dcgm-exporter on "another host": the fixtures in `data/`, served over real
HTTP (stdlib `http.server`), with the energy counters rising as time passes.

`FakeDcgmExporter` serves from a thread of the test's own process; `ExporterProcess` runs the same
server in a process of its own (`python -m tests.server.telemetry.fake_dcgm_exporter`), so that a
busy gateway under test shares no interpreter with it, as with an exporter on another host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from server.runtime.ports import free_port
from server.telemetry.dcgm_source import ENERGY_METRIC, POWER_METRIC

DATA = Path(__file__).parent / "data"
TWO_H100 = DATA / "dcgm-exporter-2xH100.txt"
POWER_ONLY_P40 = DATA / "dcgm-exporter-power-only-P40.txt"
REPO_ROOT = Path(__file__).resolve().parents[3]
_GPU = re.compile(r'[{,]gpu="([^"]+)"')


def recorded(path: Path = TWO_H100) -> str:
    return path.read_text(encoding="utf-8")


def with_values(
    text: str, energy_mj: Mapping[str, int] | None = None, power_w: Mapping[str, float] | None = None
) -> str:
    """`text` with these GPUs' counter (mJ, printed as `%d`) and power (W, as `%f`) values, by their
    `gpu` label; every other line, and other GPUs, as recorded."""
    lines = []
    for line in text.splitlines():
        for name, values, fmt in ((ENERGY_METRIC, energy_mj, "{:d}"), (POWER_METRIC, power_w, "{:f}")):
            if values and line.startswith(name + "{"):
                match = _GPU.search(line)
                if match and match[1] in values:
                    line = line.rsplit(" ", 1)[0] + " " + fmt.format(values[match[1]])
        lines.append(line)
    return "\n".join(lines) + "\n"


def recorded_energy_mj(text: str) -> dict[str, int]:
    """The counter values (mJ) of each GPU as the text has them."""
    found = {}
    for line in text.splitlines():
        match = _GPU.search(line)
        if line.startswith(ENERGY_METRIC + "{") and match:
            found[match[1]] = int(line.rsplit(" ", 1)[1])
    return found


class FakeDcgmExporter:
    """Serves `template` at http://127.0.0.1:PORT/metrics; each GPU's counter rises from its recorded
    value (mJ) at the GPU's power now, `watts[gpu]` (change it with `set_watts`, or over HTTP with
    GET /control?gpu=0&watts=400), which is also what its power reads. `stop()` closes the port, as
    a stopped exporter would (connection refused)."""

    def __init__(self, template: str | None = None, watts: Mapping[str, float] | None = None, port: int = 0):
        self.template = recorded() if template is None else template
        self.watts = dict(watts or {"0": 300.0, "1": 70.0})
        self.scrapes = 0
        self._lock = threading.Lock()
        self._energy_mj = {gpu: float(value) for gpu, value in recorded_energy_mj(self.template).items()}
        self._since_s = time.monotonic()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlparse(self.path)
                if path.path == "/control":
                    query = parse_qs(path.query)
                    exporter.set_watts(query["gpu"][0], float(query["watts"][0]))
                    body = b"ok\n"
                elif path.path == "/metrics":
                    exporter.scrapes += 1
                    body = exporter.text().encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/metrics"

    def set_watts(self, gpu: str, watts: float) -> None:
        with self._lock:
            self._advance()
            self.watts[gpu] = watts

    def text(self) -> str:
        with self._lock:
            self._advance()
            energy = {gpu: int(value) for gpu, value in self._energy_mj.items()}
            return with_values(self.template, energy, self.watts)

    def _advance(self) -> None:
        now_s = time.monotonic()
        for gpu in self._energy_mj:
            self._energy_mj[gpu] += self.watts.get(gpu, 0.0) * (now_s - self._since_s) * 1000
        self._since_s = now_s

    def start(self) -> FakeDcgmExporter:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread.is_alive():
            self._thread.join(10)


class ExporterProcess:
    """`FakeDcgmExporter` (the 2 x H100 fixture) in a process of its own, on a free port."""

    def __init__(self, watts: Mapping[str, float]):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        command = [sys.executable, "-m", "tests.server.telemetry.fake_dcgm_exporter", "--port", str(self.port)]
        self._process = subprocess.Popen([*command, "--watts", json.dumps(dict(watts))], cwd=REPO_ROOT, env=env)
        deadline = time.monotonic() + 30
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the stand-in DCGM exporter did not start")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def set_watts(self, gpu: str, watts: float) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/control?gpu={gpu}&watts={watts}", timeout=10):
            pass

    def stop(self) -> None:
        """End the process (its port closes: connection refused from then on)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--watts", default='{"0": 300.0, "1": 70.0}', help="JSON: gpu label -> watts")
    args = parser.parse_args(argv)
    FakeDcgmExporter(watts=json.loads(args.watts), port=args.port).serve_forever()


if __name__ == "__main__":
    main()
