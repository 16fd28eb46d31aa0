"""The virtual customer: a Locust user that asks the OpenAI-compatible chat API with streaming.

Per request it measures time to first token (first event carrying content), time per output
token ((end − first token) / (completion tokens − 1), vLLM's definition), end-to-end latency,
and takes tokens from the server's `usage` (it asks `stream_options.include_usage`). It reports
them through Locust's own request events, so they show in Locust's tables, CSV and HTML:

| Type | Name | "response time" column holds |
| --- | --- | --- |
| POST | /v1/chat/completions | end-to-end latency, ms ("size" = completion tokens); failures here |
| METRIC | ttft_ms, tpot_ms | TTFT and TPOT, ms |
| METRIC | prompt_tokens, completion_tokens | token counts |

A failure's message says what kind it was, so a run can tell clean errors from broken ones:
`HTTP 503: <message>` (an OpenAI-shaped error body), `HTTP 502 (not an OpenAI error): <body>`,
`stream error 502: <message>` (an error event, then `[DONE]`), `stream ended without [DONE]`
(possibly `after stream error ...`), or the client's exception (`ConnectionError: ...`).

Importing this module imports Locust (which monkey-patches with gevent): load processes only.
"""

from __future__ import annotations

import json
import time

import gevent
import requests
from locust import User, constant, task
from locust.exception import StopUser

from loadtest.arrivals import Arrival
from loadtest.feed import FEED_ATTRIBUTE, ArrivalFeed
from loadtest.results import Sample

CHAT_PATH = "/v1/chat/completions"
CONNECT_TIMEOUT_S = 10.0


class SupportCustomer(User):
    """Takes arrivals from the process's `ArrivalFeed` and sends each one when it is due."""

    wait_time = constant(0)  # pacing is the arrival schedule's job, not Locust's wait time

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def ask(self) -> None:
        feed: ArrivalFeed | None = getattr(self.environment, FEED_ATTRIBUTE, None)
        if feed is None:  # a worker whose plan has not arrived yet
            gevent.sleep(0.05)
            return
        arrival = feed.take()
        if arrival is None:
            raise StopUser()
        delay = feed.seconds_until(arrival)
        if delay > 0:
            gevent.sleep(delay)
        feed.in_flight += 1
        try:
            sample = self._send(feed, arrival)
        finally:
            feed.in_flight -= 1
        feed.record(sample)
        self._report(sample)

    def _send(self, feed: ArrivalFeed, arrival: Arrival) -> Sample:
        body = feed.workload.request(arrival.index)
        stream = _StreamReading()
        sent = time.time()
        try:
            with self.session.post(
                feed.target + CHAT_PATH, json=body, stream=True, timeout=(CONNECT_TIMEOUT_S, feed.timeout_s)
            ) as response:
                if response.status_code >= 400:
                    stream.error = _http_error(response.status_code, response.content)
                else:
                    for chunk in response.iter_content(chunk_size=None):
                        stream.feed(chunk)
                    stream.finish()
        except requests.RequestException as exc:
            stream.error = f"{exc.__class__.__name__}: {exc}"[:200]
        end = time.time()
        return stream.sample(arrival, sent - feed.t0_epoch, end - feed.t0_epoch, sent)

    def _report(self, sample: Sample) -> None:
        fire = self.environment.events.request.fire
        fire(
            request_type="POST",
            name=CHAT_PATH,
            response_time=sample.e2e_ms or 0.0,
            response_length=sample.completion_tokens or 0,
            exception=RuntimeError(sample.error) if sample.error else None,
            context={"phase": sample.phase},
        )
        if not sample.ok:
            return
        for name, value in (
            ("ttft_ms", sample.ttft_ms),
            ("tpot_ms", sample.tpot_ms),
            ("prompt_tokens", sample.prompt_tokens),
            ("completion_tokens", sample.completion_tokens),
        ):
            if value is not None:
                fire(
                    request_type="METRIC", name=name, response_time=value, response_length=0, exception=None, context={}
                )


class _StreamReading:
    """Reads an SSE stream of chat completion chunks: first content time, usage, errors."""

    def __init__(self) -> None:
        self._buffer = b""
        self.first_token_epoch: float | None = None
        self.usage: dict | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            self._event(event)

    def finish(self) -> None:
        if self._buffer.strip():
            self._event(self._buffer)
        if not self.done:
            self.error = "stream ended without [DONE]" + (f" after {self.error}" if self.error else "")
        elif self.error is None and self.usage is None:
            self.error = "stream carried no usage"

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if chunk.get("error"):
                code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
                self.error = f"stream error {code}: {_error_text(chunk['error'])}"
            if self.first_token_epoch is None and any(
                (choice.get("delta") or {}).get("content") or choice.get("text")
                for choice in chunk.get("choices") or []
            ):
                self.first_token_epoch = time.time()
            if chunk.get("usage"):
                self.usage = chunk["usage"]

    def sample(self, arrival: Arrival, sent: float, end: float, sent_epoch: float) -> Sample:
        ok = self.error is None
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ttft_ms = tpot_ms = None
        if self.first_token_epoch is not None:
            ttft_ms = (self.first_token_epoch - sent_epoch) * 1000
            if completion and completion > 1:
                tpot_ms = (end - (self.first_token_epoch - sent_epoch) - sent) * 1000 / (completion - 1)
        return Sample(
            index=arrival.index,
            phase=arrival.phase,
            sched=arrival.offset_s,
            sent=sent,
            end=end,
            ok=ok,
            ttft_ms=ttft_ms if ok else None,
            tpot_ms=tpot_ms if ok else None,
            e2e_ms=(end - sent) * 1000,
            prompt_tokens=prompt,
            completion_tokens=completion,
            error=self.error,
        )


def _http_error(status: int, content: bytes) -> str:
    """`HTTP 503: message` for an OpenAI-shaped error body; any other body is quoted and marked."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and "message" in error and "type" in error:
        return f"HTTP {status}: {_error_text(error)}"
    return f"HTTP {status} (not an OpenAI error): {content[:120].decode(errors='replace')}"


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:160]
    return str(error)[:160]
