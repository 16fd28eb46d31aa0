"""GET /dashboard: its files in-process, then the page in a real headless Chromium on the real stack.

The browser is driven over the Chrome DevTools protocol (`websockets`, already a dependency), so
there is no chromedriver or selenium; `scripts/install-browser.sh` (run by `make test`) installs it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from websockets.sync.client import ClientConnection, connect

from server.telemetry import dashboard
from tests.support import REPO_ROOT, Stack, http_get, post_json, wait_for

SCREENSHOT = REPO_ROOT / "test-artifacts" / "dashboard.png"
BROWSERS = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
POLL_S = 2.0  # the page's polling interval
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # no update or safe-browsing traffic of its own
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1280,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # it writes the port it chose to DevToolsActivePort in the profile
]


# ---- the router's files, in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(dashboard.router)
    return TestClient(app)


def test_page_and_every_file_it_names_are_served(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    names = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/dashboard/static/vendor/uplot/uPlot.iife.min.js" in names and "/dashboard/static/dashboard.js" in names
    for name in names:
        if name.startswith("data:"):
            continue
        assert name.startswith("/dashboard/static/"), f"{name}: the page must load nothing from elsewhere"
        asset = client.get(name)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name


def test_unknown_asset_is_an_openai_shaped_404(client: TestClient) -> None:
    response = client.get("/dashboard/static/..%2Fsettings.py")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# ---- the page in Chromium, on the real stack ------------------------------------------------------


class Browser:
    """One headless Chromium tab over the DevTools protocol; it keeps every event it was sent."""

    def __init__(self, tab: ClientConnection) -> None:
        self.tab = tab
        self.events: list[dict[str, Any]] = []
        self._last_id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        self.tab.send(json.dumps({"id": self._last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.tab.recv(timeout=30))
            if message.get("id") == self._last_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout_s: float) -> None:
        if not wait_for(lambda: self.evaluate(expression), timeout_s, interval_s=0.2):
            raise AssertionError(f"not true in {timeout_s} s: {expression}; dashboardState={self.state()}")

    def state(self) -> dict[str, Any]:
        return self.evaluate("window.dashboardState && {...dashboardState, lastStats: undefined}")

    def text(self, element_id: str) -> str:
        return self.evaluate(f"document.getElementById({element_id!r}).textContent")

    def number(self, element_id: str) -> float | None:
        value = self.evaluate(f"document.getElementById({element_id!r}).dataset.value")
        return float(value) if value else None

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and the browser's own error log entries."""
        self.evaluate("0")  # collect what arrived since the last command
        errors = []
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                errors.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(f"console.{params['type']}: {[arg.get('value') for arg in params['args']]}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                errors.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        return errors

    def requested_urls(self) -> list[str]:
        self.evaluate("0")
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@contextmanager
def open_browser(profile: Path) -> Iterator[Browser]:
    """A fresh headless Chromium with one blank tab, its Page/Runtime/Log/Network events on."""
    log = profile.parent / "chromium.log"
    with log.open("w") as stderr:
        process = _start_chromium(_find_browser(), profile, stderr)
    try:
        port_file = profile / "DevToolsActivePort"
        if not wait_for(lambda: process.poll() is not None or port_file.exists(), 30):
            raise AssertionError(f"Chromium opened no DevTools port in 30 s: {log.read_text()}")
        if process.poll() is not None:
            raise AssertionError(f"Chromium exited with {process.returncode}: {log.read_text()}")
        _, body = http_get(f"http://127.0.0.1:{int(port_file.read_text().split()[0])}/json/list")
        tab_url = next(target for target in json.loads(body) if target["type"] == "page")["webSocketDebuggerUrl"]
        with connect(tab_url, max_size=None, open_timeout=10) as tab:
            browser = Browser(tab)
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.send(f"{domain}.enable")
            yield browser
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _start_chromium(executable: str, profile: Path, stderr: IO[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,  # its helpers share its process group, ended as one in open_browser
    )


def _find_browser() -> str:
    for name in [os.environ.get("CHROME", ""), *BROWSERS]:
        if name and (path := shutil.which(name)):
            return path
    pytest.fail(
        "no Chromium for the dashboard test: run scripts/install-browser.sh (`make test` does),"
        " or set CHROME=/path/to/chrome"
    )


@pytest.fixture(scope="module")
def page(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """The dashboard open in Chromium, past its first successful poll."""
    status, _ = http_get(f"{stack.url}/dashboard")
    assert status == 200, f"GET /dashboard answered {status}: is server.telemetry.dashboard.router included in the app?"
    with open_browser(tmp_path_factory.mktemp("chromium") / "profile") as browser:
        browser.send("Page.navigate", url=f"{stack.url}/dashboard")
        browser.wait_until("window.dashboardState && dashboardState.polls >= 1", 15)
        yield browser


def test_dashboard_polls_and_draws_with_no_errors_and_nothing_from_outside(page: Browser, stack: Stack) -> None:
    page.wait_until("dashboardState.polls >= 2", 5 * POLL_S)
    charts = page.state()["charts"]
    assert charts["throughput"] >= 2 and charts["in_flight"] >= 2, charts
    assert page.evaluate("document.querySelectorAll('#chart-latency canvas').length") == 1
    assert page.evaluate("document.getElementById('conn-status').dataset.state") == "live"
    assert page.console_errors() == []
    urls = page.requested_urls()
    outside = [url for url in urls if urlsplit(url).scheme != "data" and urlsplit(url).hostname != "127.0.0.1"]
    assert outside == [] and f"{stack.url}/dashboard/static/dashboard.js" in urls


def test_chat_requests_show_in_totals_and_latency_chart(page: Browser, stack: Stack) -> None:
    before = page.number("requests-total")
    assert before is not None
    for n in range(3):
        body = {"model": "student", "messages": [{"role": "user", "content": f"Xin chào {n}"}], "max_tokens": 16}
        status, reply = post_json(f"{stack.url}/v1/chat/completions", body)
        assert status == 200, reply

    page.wait_until(f"Number(document.getElementById('requests-total').dataset.value) >= {before + 3}", 5 * POLL_S)
    page.wait_until("dashboardState.charts.latency >= 1", 5 * POLL_S)
    assert page.number("tokens-completion") >= 3
    page.screenshot(SCREENSHOT)
    print(f"dashboard screenshot: {SCREENSHOT}")
    assert page.console_errors() == []


def test_energy_status_is_honest(page: Browser, stack: Stack) -> None:
    energy = json.loads(http_get(f"{stack.url}/stats")[1])["energy"]
    banner, charts = page.text("energy-status"), page.state()["charts"]
    if energy["status"] == "unavailable":  # no GPU and no RAPL, as on CI
        assert banner == f"energy: not measured — {energy['reason']}"
        assert page.text("energy-kwh") == "not measured" and page.text("cost-electricity") == "not measured"
        assert charts["power"] == 0 and charts["energy"] == 0, charts
        assert page.evaluate("document.getElementById('chart-power').hidden") is True
    else:
        assert banner.startswith(f"energy: measured by {energy['source']}"), banner
        page.wait_until("dashboardState.charts.power >= 1 && dashboardState.charts.energy >= 1", 5 * POLL_S)


def test_unreachable_gateway_is_shown_and_polling_goes_on(page: Browser) -> None:
    offline = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    first_event = len(page.events)
    page.send("Network.emulateNetworkConditions", offline=True, **offline)
    try:
        page.wait_until("document.getElementById('conn-status').dataset.state === 'error'", 5 * POLL_S)
        assert page.text("conn-status").startswith("gateway unreachable, retrying")
        polls = page.state()["polls"]
    finally:
        page.send("Network.emulateNetworkConditions", offline=False, **offline)
    page.wait_until(f"dashboardState.polls > {polls}", 5 * POLL_S)
    assert page.evaluate("document.getElementById('conn-status').dataset.state") == "live"
    # The failed fetches are logged by the browser as network errors; the page itself threw nothing.
    during = page.events[first_event:]
    del page.events[first_event:]
    page.events.extend(e for e in during if not _is_network_error(e))
    assert page.console_errors() == []


def _is_network_error(event: dict[str, Any]) -> bool:
    return event["method"] == "Log.entryAdded" and event["params"]["entry"]["source"] == "network"
