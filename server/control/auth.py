"""Who may call: optional API keys on `/v1/*`, per-key rate limits, and who may watch.

Keys come as `name=key` pairs (several, comma-separated or one per line in a file). Only their
SHA-256 digests are kept, a presented key is compared with every digest in constant time, and
no key is ever logged: log lines and errors name the key's `name` at most.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from server.gateway.errors import error_response
from server.telemetry.request_record import RequestRecord

ObservabilityAccess = Literal["open", "key", "localhost"]
OBSERVABILITY_PATHS = ("/metrics", "/stats", "/dashboard")


class KeyFileError(ValueError):
    """The keys given cannot be used; the message says which line and why (never the key)."""


def parse_keys(lines: Iterable[str], origin: str) -> dict[bytes, str]:
    """`name=key` entries (blank lines and `#` comments skipped) -> {sha256(key): name}."""
    digests: dict[bytes, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise KeyFileError(f"{origin}, entry {number}: expected name=key")
        if len(key) < 16:
            raise KeyFileError(f"{origin}, entry {number} ({name}): a key needs at least 16 characters")
        digest = hashlib.sha256(key.encode()).digest()
        if digest in digests:
            raise KeyFileError(f"{origin}, entry {number} ({name}): same key as {digests[digest]}")
        digests[digest] = name
    return digests


def load_keys(inline: str | None, key_file: Path | None) -> dict[bytes, str]:
    """Keys from `STUDENT_API_KEYS` (comma-separated) and/or a file (one per line)."""
    digests: dict[bytes, str] = {}
    if inline:
        digests.update(parse_keys(inline.split(","), "STUDENT_API_KEYS"))
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise KeyFileError(f"cannot read the API key file {key_file}: {exc.strerror}") from None
        digests.update(parse_keys(text.splitlines(), str(key_file)))
    return digests


def key_name(digests: dict[bytes, str], presented: str) -> str | None:
    """The name of the presented key, or None; compares against every digest (constant time)."""
    candidate = hashlib.sha256(presented.encode()).digest()
    found = None
    for digest, name in digests.items():
        if hmac.compare_digest(digest, candidate):
            found = name
    return found


@dataclass
class RateLimiter:
    """Requests per minute per key: a token bucket refilled continuously (burst = one minute)."""

    per_minute: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (tokens, at_s)

    def admit(self, name: str, now_s: float) -> float:
        """0 when admitted (one token taken), else the seconds until a token is free."""
        tokens, at_s = self._buckets.get(name, (float(self.per_minute), now_s))
        tokens = min(float(self.per_minute), tokens + (now_s - at_s) * self.per_minute / 60.0)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now_s)
            return 0.0
        self._buckets[name] = (tokens, now_s)
        return (1.0 - tokens) * 60.0 / self.per_minute


class TokenLimiter:
    """Tokens (prompt + completion) per minute per key, over a sliding 60-s window.

    A request's tokens are known only when it has finished (from vLLM's `usage`), so they are
    charged then, and a key is refused new requests while its window holds `per_minute` tokens
    or more. A request admitted under the limit may therefore take its key over it; the key then
    waits until enough of its window has expired. Memory: per key, one (time, tokens) pair per
    request of the last minute; pairs are dropped as they expire and idle keys are forgotten.
    """

    def __init__(self, per_minute: int, window_s: float = 60.0):
        if per_minute < 1 or window_s <= 0:
            raise ValueError("per_minute must be >= 1 and window_s > 0")
        self.per_minute = per_minute
        self.window_s = window_s
        self._spent: dict[str, deque[tuple[float, int]]] = {}  # name -> (finished_s, tokens), oldest first
        self._totals: dict[str, int] = {}  # name -> tokens in its window

    def add(self, name: str, tokens: int, now_s: float) -> None:
        """Charge `name` with `tokens` used by a request that finished at `now_s`."""
        if tokens <= 0:
            return
        self._spent.setdefault(name, deque()).append((now_s, tokens))
        self._totals[name] = self._totals.get(name, 0) + tokens
        self._expire(name, now_s)

    def charge(self, record: RequestRecord) -> None:
        """Charge a finished request's tokens to its key (the recorder calls this once per request)."""
        if record.key_name is None:
            return
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        self.add(record.key_name, tokens, record.finished_s or time.monotonic())

    def admit(self, name: str, now_s: float) -> float:
        """0 when `name` is under its limit, else the seconds until enough of its window expires."""
        if self._expire(name, now_s) < self.per_minute:
            return 0.0
        over = self._totals[name] - self.per_minute  # under again once more than this has expired
        spent = self._spent[name]
        for finished_s, tokens in spent:
            over -= tokens
            if over < 0:
                return finished_s + self.window_s - now_s
        return spent[-1][0] + self.window_s - now_s

    def tokens_in_window(self, name: str, now_s: float) -> int:
        return self._expire(name, now_s)

    def _expire(self, name: str, now_s: float) -> int:
        """Drop `name`'s entries older than the window; returns the tokens left in it."""
        spent = self._spent.get(name)
        if spent is None:
            return 0
        horizon = now_s - self.window_s
        while spent and spent[0][0] <= horizon:
            self._totals[name] -= spent.popleft()[1]
        if not spent:
            del self._spent[name], self._totals[name]
            return 0
        return self._totals[name]


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class AccessMiddleware:
    """ASGI middleware: keys on /v1/*, rate limits per key, and access to the observability pages.

    With no keys configured /v1/* is open (and rate limits, if set, apply to all callers as one).
    The key's name is put in `scope["state"]["api_key_name"]` for accounting. `token_limiter`
    is shared with the recorder, which charges it as requests finish.
    """

    def __init__(
        self,
        app: ASGIApp,
        digests: dict[bytes, str],
        observability: ObservabilityAccess = "open",
        requests_per_minute: int | None = None,
        token_limiter: TokenLimiter | None = None,
    ):
        self._app = app
        self._digests = digests
        self._observability = observability
        self._limiter = RateLimiter(requests_per_minute) if requests_per_minute else None
        self._token_limiter = token_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        refusal = None
        if path.startswith("/v1/"):
            refusal = self._check_api(scope)
        elif path.startswith(OBSERVABILITY_PATHS):
            refusal = self._check_observer(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _check_api(self, scope: Scope):
        name = "anonymous"
        if self._digests:
            presented = _bearer(scope)
            found = key_name(self._digests, presented) if presented else None
            if found is None:
                message = "invalid API key" if presented else "missing API key: send Authorization: Bearer KEY"
                return error_response(
                    401, message, type_="authentication_error", headers={"WWW-Authenticate": "Bearer"}
                )
            name = found
        scope.setdefault("state", {})["api_key_name"] = name
        now_s = time.monotonic()
        if self._token_limiter is not None:  # first: refusing here costs the key no request
            wait_s = self._token_limiter.admit(name, now_s)
            if wait_s > 0:
                return error_response(
                    429,
                    f"rate limit of {self._token_limiter.per_minute} tokens (prompt + completion) per minute "
                    f"reached for key '{name}'",
                    type_="rate_limit_error",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
        if self._limiter is not None:
            wait_s = self._limiter.admit(name, now_s)
            if wait_s > 0:
                return error_response(
                    429,
                    f"rate limit of {self._limiter.per_minute} requests per minute reached for key '{name}'",
                    type_="rate_limit_error",
                    headers={"Retry-After": str(math.ceil(wait_s))},
                )
        return None

    def _check_observer(self, scope: Scope):
        if self._observability == "localhost" and not _is_loopback(scope):
            return error_response(403, f"{scope['path']} is served to localhost only", type_="permission_error")
        if self._observability == "key":
            presented = _bearer(scope)
            if presented is None or key_name(self._digests, presented) is None:
                return error_response(
                    401,
                    "this page needs an API key",
                    type_="authentication_error",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None
