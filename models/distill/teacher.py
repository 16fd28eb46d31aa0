"""An async client for an OpenAI-compatible teacher: pacing, retries with backoff, token usage.

`student distill` asks a teacher model (any `/v1/chat/completions` server: OpenAI, DeepSeek, a
vLLM, this project's own gateway) for questions and answers. This module is the only place that
talks HTTP to it:

- **Pacing.** With `requests_per_minute` set, request starts (retries included) are spaced at
  least 60/rpm seconds apart, so a run stays under a provider's limit instead of bouncing off it.
- **Retries.** 408, 429, every 5xx, connection errors and timeouts are retried up to
  `max_retries` times. The wait honours the server's `Retry-After` (seconds or an HTTP date) when
  present, plus up to `base_delay_s` of jitter so clients told the same time do not return
  together; otherwise it is exponential with jitter: a uniform draw in [d/2, d] with
  d = min(max_delay_s, base_delay_s * 2**retry). Other 4xx answers are not retried: they raise
  `TeacherRejectedError` at once (401/403: the key; 404: the model or the URL).
- **Usage.** Every reply's `usage` (prompt and completion tokens) is added to `TeacherUsage`,
  with the number of requests sent and retries by reason (the status code, "timeout",
  "connection").
- **Reasoning.** A reasoning server (vLLM with a reasoning parser, DeepSeek) returns the chain
  of thought apart from the answer, as `message.reasoning_content` or `message.reasoning`; it is
  returned as `ChatReply.reasoning`. Splitting `<think>` out of the content is the caller's job.

The API key is sent as `Authorization: Bearer KEY` and appears nowhere else: not in errors, not
in `repr(TeacherConfig)`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import aiohttp

RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx
RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream", "n"})
ERROR_TEXT_CHARS = 300

Sleep = Callable[[float], Awaitable[None]]


class TeacherError(Exception):
    """The teacher could not give a usable reply; the message says why."""


class TeacherUnavailableError(TeacherError):
    """Transient failures (429, 5xx, timeouts, connection errors) outlasted every retry."""

    def __init__(self, message: str, attempts: int, reason: str):
        super().__init__(message)
        self.attempts = attempts
        self.reason = reason


class TeacherRejectedError(TeacherError):
    """A 4xx answer that retrying cannot fix (bad key, unknown model, bad request)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    @property
    def fatal(self) -> bool:
        """True when every later request would fail the same way (key, permission, model/URL)."""
        return self.status in (401, 403, 404)


class TeacherReplyError(TeacherError):
    """A 200 answer without a usable message (not JSON, no choices, no text)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait between attempts; delays in seconds."""

    max_retries: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay_s(self, retry: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds to wait before 0-based `retry`: `Retry-After` + jitter, else exponential + jitter."""
        if retry_after_s is not None:
            return retry_after_s + rng.uniform(0.0, self.base_delay_s)
        ceiling_s = min(self.max_delay_s, self.base_delay_s * 2**retry)
        return rng.uniform(ceiling_s / 2, ceiling_s)


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher is and how to talk to it.

    `url` is the API base (e.g. `https://api.deepseek.com/v1`, `http://127.0.0.1:8000/v1`);
    `extra_body` is merged into every request body (vLLM extras such as `structured_outputs`,
    `top_k`, `min_tokens`); it may not set `model`, `messages`, `stream` or `n`. `key_env` names
    where the key came from (an environment variable), for error messages only.
    """

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    key_env: str | None = None
    timeout_s: float = 120.0
    requests_per_minute: float | None = None
    retry: RetryPolicy = RetryPolicy()
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher URL must start with http:// or https:// (got {self.url!r})")
        reserved = RESERVED_BODY_KEYS & set(self.extra_body)
        if reserved:
            raise ValueError(f"extra body may not set {', '.join(sorted(reserved))}")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be > 0")
        if self.retry.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the answer text, the separate reasoning if the server gave one."""

    content: str
    reasoning: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    has_usage: bool = True


@dataclass
class TeacherUsage:
    """Running totals for one client: requests sent (retries included), replies, tokens."""

    requests: int = 0
    replies: int = 0
    replies_without_usage: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def retries(self) -> int:
        return sum(self.retries_by_reason.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "replies": self.replies,
            "retries": self.retries,
            "retries_by_reason": dict(sorted(self.retries_by_reason.items())),
            "replies_without_usage": self.replies_without_usage,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass(frozen=True)
class Price:
    """A teacher's price in USD per million tokens, input (prompt) and output (completion)."""

    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_mtok + completion_tokens * self.output_usd_per_mtok) / 1e6


class RequestPacer:
    """Spaces request starts at least 60/rpm seconds apart (a steady rate, no burst)."""

    def __init__(
        self,
        requests_per_minute: float | None,
        sleep: Sleep = asyncio.sleep,
        clock_s: Callable[[], float] = time.monotonic,
    ):
        self._interval_s = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_s = float("-inf")
        self._lock = asyncio.Lock()
        self._sleep = sleep
        self._clock_s = clock_s

    async def wait(self) -> None:
        """Return when the next request may start."""
        if not self._interval_s:
            return
        async with self._lock:
            now_s = self._clock_s()
            start_s = max(now_s, self._next_s)
            self._next_s = start_s + self._interval_s
            if start_s > now_s:
                await self._sleep(start_s - now_s)


@dataclass(frozen=True)
class _Attempt:
    """Why one attempt failed in a way worth retrying."""

    reason: str  # "429", "503", "timeout", "connection"
    detail: str
    retry_after_s: float | None = None


def parse_retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_text(status: int, body: bytes) -> str:
    """A short description of an error answer: the OpenAI-shaped message, else the body's start."""
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        message = error.get("message") if isinstance(error, dict) else payload.get("message") or payload.get("detail")
        if isinstance(message, str) and message:
            text = message
    text = " ".join(text.split())
    if len(text) > ERROR_TEXT_CHARS:
        text = text[:ERROR_TEXT_CHARS] + "…"
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def parse_chat_reply(payload: object, attempts: int) -> ChatReply:
    """The first choice of a `chat.completion` body; `TeacherReplyError` if it has no text."""
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list) or not payload["choices"]:
        raise TeacherReplyError("the teacher's reply has no choices")
    choice = payload["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise TeacherReplyError("the teacher's reply has no message")
    content = message.get("content")
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = message.get("reasoning")
    if not isinstance(reasoning, str) or not reasoning.strip():
        reasoning = None
    if not isinstance(content, str):
        content = ""
    usage = payload.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    has_usage = isinstance(prompt_tokens, int) and isinstance(completion_tokens, int)
    return ChatReply(
        content=content,
        reasoning=reasoning,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) and has_usage else 0,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) and has_usage else 0,
        attempts=attempts,
        has_usage=has_usage,
    )


OnRetry = Callable[[str, float, int], None]  # reason, delay_s, retry number (1-based)


class TeacherClient:
    """`async with TeacherClient(config) as teacher: reply = await teacher.chat(messages)`.

    One aiohttp session for all requests; `usage` holds the totals. `rng` and `sleep` are
    injectable so tests can make jitter and waits deterministic.
    """

    def __init__(
        self,
        config: TeacherConfig,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        on_retry: OnRetry | None = None,
    ):
        self.config = config
        self.usage = TeacherUsage()
        self.on_retry = on_retry  # called before each wait: (reason, delay_s, retry number)
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._pacer = RequestPacer(config.requests_per_minute, sleep)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TeacherClient:
        headers = {"Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.config.timeout_s)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def served_models(self, max_connection_retries: int | None = None) -> list[str] | None:
        """Model ids from `GET /models`, or None when the server has no such endpoint (404/405).

        Used as a pre-flight check: an unreachable teacher or a refused key fails here, once,
        instead of on every sample. 429s and 5xx are retried per the policy; connection errors and
        timeouts at most `max_connection_retries` times (default: the policy's), so a wrong URL
        is reported in seconds.
        """
        try:
            _status, body, _attempts = await self._send("GET", "/models", None, max_connection_retries)
        except TeacherRejectedError as error:
            if error.status in (404, 405):
                return None
            raise
        payload = _json_or_none(body)
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return None
        return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> ChatReply:
        """One non-streaming chat completion, retried per the policy; usage is counted."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(message) for message in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        body.update(self.config.extra_body)
        _status, raw, attempts = await self._send("POST", "/chat/completions", body, None)
        payload = _json_or_none(raw)
        if payload is None:
            raise TeacherReplyError("the teacher's reply is not JSON")
        reply = parse_chat_reply(payload, attempts)
        self.usage.replies += 1
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        if not reply.has_usage:
            self.usage.replies_without_usage += 1
        return reply

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None, max_connection_retries: int | None
    ) -> tuple[int, bytes, int]:
        """Send until success or a final error; returns (status, body, attempts)."""
        if self._session is None:
            raise RuntimeError("use TeacherClient in `async with`")
        retries_allowed = self.config.retry.max_retries
        connection_retries_allowed = retries_allowed if max_connection_retries is None else max_connection_retries
        retry = 0
        while True:
            await self._pacer.wait()
            self.usage.requests += 1
            failure = await self._attempt(method, path, body)
            if isinstance(failure, tuple):
                return (*failure, retry + 1)
            unreachable = failure.reason in ("connection", "timeout")
            if retry >= retries_allowed or (unreachable and retry >= connection_retries_allowed):
                raise TeacherUnavailableError(
                    f"teacher at {self.config.base_url} failed {retry + 1} time(s); last: {failure.detail}",
                    attempts=retry + 1,
                    reason=failure.reason,
                )
            delay_s = self.config.retry.delay_s(retry, failure.retry_after_s, self._rng)
            retry += 1
            self.usage.retries_by_reason[failure.reason] += 1
            if self.on_retry is not None:
                self.on_retry(failure.reason, delay_s, retry)
            await self._sleep(delay_s)

    async def _attempt(self, method: str, path: str, body: Mapping[str, Any] | None) -> tuple[int, bytes] | _Attempt:
        """One request: (status, body) on 2xx, an `_Attempt` when worth retrying, else raises."""
        assert self._session is not None
        try:
            async with self._session.request(method, self.config.base_url + path, json=body) as response:
                raw = await response.read()
                status = response.status
                retry_after_s = parse_retry_after_s(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return _Attempt("timeout", f"no complete answer within {self.config.timeout_s:g} s")
        except aiohttp.ClientConnectionError as error:
            return _Attempt("connection", f"connection error: {error}")
        except aiohttp.ClientPayloadError as error:
            return _Attempt("connection", f"answer cut off: {error}")
        if 200 <= status < 300:
            return status, raw
        detail = error_text(status, raw)
        if status in RETRYABLE_STATUSES or status >= 500:
            return _Attempt(str(status), detail, retry_after_s)
        if status in (401, 403):
            detail += self._key_hint()
        raise TeacherRejectedError(f"teacher at {self.config.base_url} refused {method} {path}: {detail}", status)

    def _key_hint(self) -> str:
        """What to check after a 401/403, without ever showing the key."""
        where = f"${self.config.key_env}" if self.config.key_env else "the API key"
        if self.config.api_key is None:
            return f"; no key was sent: set {where}"
        return f"; check the key in {where}"


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
