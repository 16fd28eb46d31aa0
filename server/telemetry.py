"""What one request cost in time and tokens, observed on its way through the gateway.

Tokens come from the upstream's `usage` (chunks are not tokens). For streams the gateway asks
vLLM for `stream_options.include_usage` and drops that extra usage event again when the client
did not ask for it, so the client sees exactly what it would have seen from vLLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request's measurements; times are `time.monotonic()` seconds, `status` an HTTP code."""

    route: str
    upstream: str
    stream: bool
    model: str | None = None
    started_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    finished_s: float | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finished_s is None else (self.finished_s - self.started_s) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """Time to the first event carrying content (streams only)."""
        return None if self.first_token_s is None else (self.first_token_s - self.started_s) * 1000

    @property
    def tpot_ms(self) -> float | None:
        """(end − first token) / (completion tokens − 1), as vLLM's benchmark defines it."""
        if self.first_token_s is None or self.finished_s is None or (self.completion_tokens or 0) < 2:
            return None
        return (self.finished_s - self.first_token_s) * 1000 / (self.completion_tokens - 1)

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)


def request_usage_in_stream(payload: dict[str, Any]) -> tuple[bytes | None, bool]:
    """For a streaming request: (body to send upstream or None if unchanged, client asked for usage)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return None, True
    rewritten = dict(payload)
    rewritten["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(rewritten, ensure_ascii=False).encode(), False


class StreamObserver:
    """Watches relayed SSE events: first content, usage; says which events the client gets."""

    __slots__ = ("_record", "_client_wants_usage")

    def __init__(self, record: RequestRecord, client_wants_usage: bool):
        self._record = record
        self._client_wants_usage = client_wants_usage

    def keep(self, event: bytes) -> bool:
        """Record what `event` tells; False for the usage-only event the client did not ask for."""
        if not event.startswith(b"data: {"):
            return True
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return True
        choices = chunk.get("choices") or []
        if self._record.first_token_s is None and any(_has_content(choice) for choice in choices):
            self._record.first_token_s = time.monotonic()
        usage = chunk.get("usage")
        if usage:
            self._record.take_usage(usage)
            return bool(choices) or self._client_wants_usage
        return True


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("content"))


def take_usage_from_body(record: RequestRecord, body: bytes) -> None:
    """Token counts of a non-streaming answer, from its `usage`."""
    try:
        answer = json.loads(body)
    except ValueError:
        return
    if isinstance(answer, dict):
        record.take_usage(answer.get("usage"))


def describe(record: RequestRecord) -> str:
    """One log line per request: route, status, tokens and latencies (ms)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (
        f"{record.route} status={record.status} stream={int(record.stream)} "
        f"prompt_tokens={record.prompt_tokens} completion_tokens={record.completion_tokens} "
        f"ttft_ms={ms(record.ttft_ms)} tpot_ms={ms(record.tpot_ms)} e2e_ms={ms(record.e2e_ms)}"
    )
