"""Load under fault: a steady Locust load while vLLM is SIGKILLed once, on a stack of its own.

Afterwards:

1. Every request the load generator scheduled ended, either answered (200, a complete stream
   ending in `[DONE]`, with usage) or with a clean OpenAI-shaped error: an HTTP error status with
   an OpenAI error body, or a stream whose error event is followed by `[DONE]`. No hung
   requests, no connection resets, no non-JSON errors. (The virtual customer names each
   failure's kind: see `loadtest/customer.py`.)
2. The ledger holds exactly the requests that reached the gateway's proxy, status by status.
   The client knows each one's status: 200 for an answer, the HTTP status of an error, the
   `code` of a stream's error event (the gateway's events carry the status it records). Not in
   the ledger, and left out of the comparison: admission control's own refusals (429 at
   capacity, 503 "not ready" when the line is full while vLLM is down), told apart by their
   messages (`server/control/admission.py`).
3. The service recovered without a manual step: `/ready` is 200 again and one more chat
   request is answered.

To be sure the kill cuts an open stream, the test opens one long stream of its own with vLLM's
engine frozen (SIGSTOP) and kills vLLM once the stream's headers have arrived; that stream must
end with an error event and `[DONE]`. Freezing first is what makes "still open" certain: tokens
the engine had already made can still reach the client after a later freeze, and on a fast box a
whole long answer can be in that pipeline when its first token shows. Only counts and shapes are
asserted, never timings (the box is small and shared).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from server.accounting.ledger import read_requests
from tests.conftest import LONG_CONTEXT_TOKENS, LONG_STACK_ARGS
from tests.support import STUDENT, Stack, http_get, post_json, start_stack, wait_for

CHAT_URL = "/v1/chat/completions"
RATE_RPS = 1.5
DURATION_S = 60  # vLLM restarts in ~30-45 s here: the run goes on past its return
LOAD = [
    "--rps",
    str(RATE_RPS),
    "--duration-s",
    str(DURATION_S),
    "--seed",
    "5",
    "--prompt-tokens",
    "30",
    "--output-tokens",
    "160",
    "--length-sigma",
    "0",
    "--system-prompt",
    "Bạn là trợ lý chăm sóc khách hàng của cửa hàng.",
    "--drain-timeout-s",
    "120",
    "--progress-interval-s",
    "5",
    "--sample-interval-s",
    "2",
    # Errors are expected here: the SLO verdict is not what this test checks.
    "--slo-ttft-p95-ms",
    "60000",
    "--slo-tpot-p95-ms",
    "10000",
    "--slo-max-error-rate",
    "1",
]
ANSWERED_BEFORE_KILL = 5  # requests in the ledger before the fault: the load is really flowing
# Admission control's own refusals (server/control/admission.py): they never reach the proxy or the ledger.
ADMISSION_MESSAGES = ("the model server is not ready", "the gateway is at capacity")


class LongStream(threading.Thread):
    """One long streamed chat (16,000 tokens on the long-context model): vLLM is killed while it
    is open."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.opened = threading.Event()  # headers in: the gateway is relaying vLLM's stream
        self.status: int | None = None
        self.data: list[str] = []  # every `data:` payload, in order
        self.failure: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": "student",
            "stream": True,
            "max_tokens": LONG_CONTEXT_TOKENS - 384,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Kể cho tôi nghe về chính sách đổi trả."}],
        }
        request = urllib.request.Request(
            self.url + CHAT_URL, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                self.status = response.status
                self.opened.set()
                for line in response:
                    if line.startswith(b"data:"):
                        self.data.append(line[5:].strip().decode())
        except BaseException as exc:
            self.failure = exc
        finally:
            self.opened.set()


def ledger_count(stack: Stack) -> int:
    return len(read_requests(stack.ledger_path)) if stack.ledger_path.exists() else 0


def kill_vllm(stack: Stack) -> None:
    """SIGKILL vLLM's API server and its engine (one process group), as a crash would."""
    api_server = stack.vllm_api_server()
    os.killpg(api_server.pid, signal.SIGKILL)


def client_failures(out: Path) -> Counter[str]:
    """Every failed request's message, from Locust's own failure table (complete, unlike the
    report's top ten). Locust writes each as the repr of the RuntimeError the customer raised."""
    failures: Counter[str] = Counter()
    with (out / "locust_failures.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            error = row["Error"]
            assert error.startswith("RuntimeError(") and error.endswith(")"), error
            failures[ast.literal_eval(error[len("RuntimeError(") : -1])] += int(row["Occurrences"])
    return failures


def expected_ledger_status(message: str) -> int | None:
    """The status the ledger holds for a failed request; None when it never reached the proxy.

    Fails on anything that is not a clean error: a non-OpenAI body, a stream cut without
    `[DONE]`, a connection reset or timeout on the client's side.
    """
    if message.startswith("HTTP ") and message[8:10] == ": ":
        if any(refusal in message for refusal in ADMISSION_MESSAGES):
            return None
        return int(message[5:8])
    if message.startswith("stream error "):
        code = message.removeprefix("stream error ").split(":", 1)[0]
        assert code.isdigit(), f"a stream error event without the status as its code: {message}"
        return int(code)
    raise AssertionError(f"not a clean error: {message}")


def test_a_vllm_crash_under_steady_load_leaves_clean_errors_a_matching_ledger_and_recovers(
    long_context_model_dir: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_stack(["--model", str(long_context_model_dir), *LONG_STACK_ARGS], tmp_path / "serve.log")
    load = None
    try:
        stack.wait_ready()
        out = tmp_path / "soak"
        with (tmp_path / "load.log").open("w") as load_log:
            load = subprocess.Popen(
                [STUDENT, "load", "soak", "--target", stack.url, "--out", str(out), *LOAD],
                stdout=load_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        assert wait_for(lambda: ledger_count(stack) >= ANSWERED_BEFORE_KILL or load.poll() is not None, 120), (
            "the load never got going"
        )
        assert load.poll() is None, (tmp_path / "load.log").read_text()[-3000:]

        long_stream = LongStream(stack.url)
        stack.vllm_engine().suspend()  # SIGKILL ends it all the same; load requests in flight are cut too
        long_stream.start()
        assert long_stream.opened.wait(120) and long_stream.failure is None, long_stream.failure
        assert long_stream.is_alive(), f"the long stream ended before the crash: {long_stream.data[-3:]}"
        kill_vllm(stack)
        killed_at = time.monotonic() - started

        long_stream.join(120)
        assert not long_stream.is_alive(), "the stream cut by the crash never ended"
        assert long_stream.failure is None and long_stream.status == 200, long_stream.failure
        assert long_stream.data[-1] == "[DONE]", long_stream.data[-3:]
        cut = json.loads(long_stream.data[-2]).get("error")
        assert cut is not None, f"the stream ended without an error event: {long_stream.data[-3:]}"
        assert set(cut) == {"message", "type", "param", "code"} and isinstance(cut["code"], int), cut

        assert load.wait(DURATION_S + 240) in (0, 1), (tmp_path / "load.log").read_text()[-3000:]
        report = json.loads((out / "report.json").read_text())

        # (3) Recovered by itself: ready again, and a new request is answered.
        assert wait_for(lambda: http_get(f"{stack.url}/ready")[0] == 200, 300, interval_s=1.0), stack.log()[-3000:]
        status, answer = post_json(
            f"{stack.url}{CHAT_URL}",
            {
                "model": "student",
                "max_tokens": 2,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "Xin chào"}],
            },
        )
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
        assert "exited unexpectedly with code -9" in stack.log()

        # (1) Every scheduled request ended, answered or with a clean error.
        requests = report["requests"]
        assert report["stopped_early"] is None and requests["total"] == report["arrivals"]["scheduled"], report
        failures = client_failures(out)
        assert sum(failures.values()) == requests["error"] and requests["error"] > 0, (failures, requests)
        expected = Counter({200: requests["ok"]})
        refused = 0
        for message, count in failures.items():
            ledger_status = expected_ledger_status(message)  # fails on an unclean error
            if ledger_status is None:
                refused += count
            else:
                expected[ledger_status] += count

        # (2) The ledger holds exactly the requests that reached the proxy, by status: the load's,
        # the long stream (its error event's code) and the request after recovery.
        expected[cut["code"]] += 1
        expected[200] += 1
        ledger = Counter(row.status for row in read_requests(stack.ledger_path))
        assert ledger == expected, {"ledger": ledger, "client": expected, "failures": failures}
        cut_streams = sum(count for message, count in failures.items() if message.startswith("stream error"))
        print(
            f"under fault: vLLM killed at {killed_at:.0f} s; {requests['total']} load requests: "
            f"{requests['ok']} answered, {requests['error']} errors ({cut_streams} streams cut, "
            f"{refused} refused by admission); "
            f"ledger by status {dict(ledger)}; {time.monotonic() - started:.0f} s in all"
        )
        assert stack.stop() == 0
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        stack.kill_all()
