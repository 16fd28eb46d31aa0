"""What one request cost in time and tokens, observed on its way through the gateway.

Tokens come from the upstream's `usage` (chunks are not tokens). For streams the gateway asks
vLLM for `stream_options.include_usage` and drops that extra usage event again when the client
did not ask for it, so the client sees exactly what it would have seen from vLLM.

While energy is measured the gateway also asks for `continuous_usage_stats`: vLLM then puts the
running `usage` on every chunk, which tells the energy meter how many tokens each request
processed in each interval (prompt tokens at prefill, output tokens as they stream). Those extra
`usage` fields are removed again unless the client asked for them.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_request_ids = itertools.count(1)
TokenSink = Callable[[int], None]


@dataclass
class RequestRecord:
    """One request's measurements; times are `time.monotonic()` seconds, `status` an HTTP code."""

    route: str
    upstream: str
    stream: bool
    model: str | None = None
    key_name: str | None = None
    routed_to: str = "local"  # "local" (the student) or "remote" (server/control/hybrid_routing.py)
    route_reason: str | None = None  # why (None: no routing, or refused before it)
    request_id: int = field(default_factory=lambda: next(_request_ids))
    started_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    finished_s: float | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    energy_j: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400

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
        tokens = self.completion_tokens
        if self.first_token_s is None or self.finished_s is None or tokens is None or tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) * 1000 / (tokens - 1)

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)


def request_usage_in_stream(payload: dict[str, Any], continuous: bool = False) -> tuple[bytes | None, UsageWish]:
    """For a streaming request: (body to send upstream, None if unchanged; what the client asked for).

    `continuous`: also ask vLLM for `usage` on every chunk (for energy attribution).
    """
    options = payload.get("stream_options")
    options = options if isinstance(options, dict) else {}
    wish = UsageWish(bool(options.get("include_usage")), bool(options.get("continuous_usage_stats")))
    wanted = {"include_usage": True, **({"continuous_usage_stats": True} if continuous else {})}
    if all(options.get(key) for key in wanted):
        return None, wish
    rewritten = {**payload, "stream_options": {**options, **wanted}}
    return json.dumps(rewritten, ensure_ascii=False).encode(), wish


@dataclass(frozen=True, slots=True)
class UsageWish:
    """Which `stream_options` the client itself set (vLLM honours continuous only with include)."""

    include_usage: bool
    continuous_usage_stats: bool

    @property
    def continuous(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class StreamObserver:
    """Watches relayed SSE events: first content, usage, tokens as they come; shapes what the client gets."""

    __slots__ = ("_on_tokens", "_record", "_tokens_seen", "_wish")

    def __init__(self, record: RequestRecord, wish: UsageWish, on_tokens: TokenSink | None = None):
        self._record = record
        self._wish = wish
        self._on_tokens = on_tokens
        self._tokens_seen = 0

    def keep(self, event: bytes) -> bytes | None:
        """Record what `event` tells; returns the event for the client, or None to drop it.

        Dropped: the usage-only event the client did not ask for. Rewritten: chunks that carry a
        running `usage` the client did not ask for (the field is removed, nothing else changes).

        This runs for every event, so after the first content it parses nothing it need not: an
        event without the bytes `"usage"` is passed on as it is, and vLLM's compact `"usage":{..}`
        is read and cut out in place. Anything else takes the full JSON parse.
        """
        if self._record.first_token_s is not None:
            if _USAGE_KEY not in event:
                return event
            kept = self._keep_usage_in_place(event)
            if kept is None or isinstance(kept, bytes):
                return kept
        return self._keep_parsed(event)

    def _keep_usage_in_place(self, event: bytes) -> bytes | object | None:
        """`keep` for a compact vLLM chunk with a `"usage":{...}` member; `_UNSURE` if not one."""
        key = event.rfind(_USAGE_MEMBER)
        if key < 0 or not event.startswith(b"data: {"):
            return _UNSURE
        begin = key + len(_USAGE_MEMBER) - 1
        end = _object_end(event, begin)
        if end < 0:
            return _UNSURE
        if _NO_CHOICES in event:
            has_choices = False
        elif _SOME_CHOICES in event:
            has_choices = True
        else:
            return _UNSURE
        try:
            usage = json.loads(event[begin:end])
        except ValueError:
            return _UNSURE
        if not usage:
            return event
        self._record.take_usage(usage)
        self._count_tokens(usage)
        if not has_choices:
            return event if self._wish.include_usage else None
        if self._wish.continuous:
            return event
        # Cut the member and the comma that joined it to its neighbour.
        if event[key - 1 : key] == b",":
            return event[: key - 1] + event[end:]
        if event[end : end + 1] == b",":
            return event[:key] + event[end + 1 :]
        return _UNSURE

    def _keep_parsed(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: {"):
            return event
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event
        choices = chunk.get("choices") or []
        if self._record.first_token_s is None and any(_has_content(choice) for choice in choices):
            self._record.first_token_s = time.monotonic()
        usage = chunk.get("usage")
        if not usage:
            return event
        self._record.take_usage(usage)
        self._count_tokens(usage)
        if not choices:
            return event if self._wish.include_usage else None
        if self._wish.continuous:
            return event
        del chunk["usage"]
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def _count_tokens(self, usage: dict[str, Any]) -> None:
        """Tell the sink how many tokens (prompt + output) this chunk's running usage added."""
        if self._on_tokens is None:
            return
        total = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
        if total > self._tokens_seen:
            self._on_tokens(total - self._tokens_seen)
            self._tokens_seen = total


_USAGE_KEY = b'"usage"'
_USAGE_MEMBER = b'"usage":{'  # vLLM's compact JSON; a key inside a string would have escaped quotes
_NO_CHOICES = b'"choices":[]'
_SOME_CHOICES = b'"choices":[{'
_UNSURE = object()


def _object_end(data: bytes, begin: int) -> int:
    """Index just past the JSON object opening at `begin`, which holds no strings with braces
    (a `usage`: numbers, null, nested counters); -1 if it does not close."""
    depth = 0
    index = begin
    while True:
        close = data.find(b"}", index)
        if close < 0:
            return -1
        depth += data.count(b"{", index, close) - 1
        if depth <= 0:
            return close + 1 if depth == 0 else -1
        index = close + 1


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

    routed = "" if record.routed_to == "local" else f" routed_to={record.routed_to}"
    return (
        f"{record.route}{routed} status={record.status} stream={int(record.stream)} "
        f"prompt_tokens={record.prompt_tokens} completion_tokens={record.completion_tokens} "
        f"ttft_ms={ms(record.ttft_ms)} tpot_ms={ms(record.tpot_ms)} e2e_ms={ms(record.e2e_ms)}"
    )
