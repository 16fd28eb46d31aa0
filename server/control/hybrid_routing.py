"""Hybrid routing: each generation request goes to the local student or to a remote (cloud) API.

The article's hybrid system answers simple questions with the local student and sends questions
that need reasoning (`tại sao`, `phân tích`, `so sánh`) to a bigger model. `decide` is that
choice as a pure function of the request and the local side's state; the rules, first match wins:

1. `header`: the route header (`X-Student-Route: local|remote`) says where. An explicit `local`
   is obeyed even when local cannot take the request (the client gets local's 503/429).
2. `model`: the request names a model that means remote (`remote`, the remote's model name).
3. `keyword:<kw>`: the last user message (a completion's prompt) contains a keyword,
   case-insensitively and as written (`tai sao` without diacritics is not `tại sao`).
4. `fallback:not-ready`: local has no healthy replica (or its vLLM is not running).
5. `fallback:capacity`: admission control would refuse the request with a 429 right now.
6. `default`: local.

Fallbacks (4, 5) apply only with `fallback` on. `RouteMiddleware` applies the rules before
admission control (remote requests take no local slot) and labels every answer with the route.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gateway.errors import error_response

Route = Literal["local", "remote"]
ROUTES: tuple[Route, ...] = ("local", "remote")
DEFAULT_ROUTE_HEADER = "X-Student-Route"
DEFAULT_KEYWORDS = ("tại sao", "phân tích", "so sánh")  # the article's reasoning keywords
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")
SCOPE_KEY = "route"  # scope["state"][SCOPE_KEY]: the RouteDecision of a routed request


def fold(text: str) -> str:
    """Text as the rules compare it: NFC (composed and decomposed diacritics are the same
    letters) and case-folded (`TẠI SAO` is `tại sao`); diacritics are kept."""
    return unicodedata.normalize("NFC", text).casefold()


@dataclass(frozen=True, slots=True)
class RoutingRules:
    """What sends a request to the remote (see the module docstring)."""

    header: str = DEFAULT_ROUTE_HEADER
    remote_models: frozenset[str] = frozenset({"remote"})
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    fallback: bool = True

    @staticmethod
    def of(header: str, remote_models: Iterable[str], keywords: Iterable[str], fallback: bool) -> RoutingRules:
        """Rules with the keywords as written (duplicates and blanks dropped)."""
        kept = tuple(dict.fromkeys(keyword.strip() for keyword in keywords if keyword.strip()))
        return RoutingRules(header, frozenset(remote_models), kept, fallback)


@dataclass(frozen=True, slots=True)
class LocalState:
    """The local side at the moment of the decision."""

    ready: bool = True  # a healthy replica (and a running vLLM child, when supervised)
    at_capacity: bool = False  # admission control would refuse one more request now


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: Route
    reason: str  # header, model, keyword:<kw>, fallback:not-ready, fallback:capacity, default


class BadRouteHeaderError(ValueError):
    """The route header holds something other than `local` or `remote`."""


def decide(
    rules: RoutingRules, headers: Mapping[str, str], payload: Mapping[str, Any] | None, local: LocalState
) -> RouteDecision:
    """Where one request goes, and why. `headers`: names in lower case (as ASGI has them);
    `payload`: the parsed body (None when it is not a JSON object: the rules on it are skipped).

    Raises BadRouteHeaderError for a route header that is neither `local` nor `remote`.
    """
    asked = headers.get(rules.header.lower())
    if asked is not None:
        route = asked.strip().lower()
        if route not in ROUTES:
            raise BadRouteHeaderError(f"{rules.header} must be 'local' or 'remote', got {asked[:40]!r}")
        return RouteDecision(route, "header")
    if payload is not None:
        model = payload.get("model")
        if isinstance(model, str) and model in rules.remote_models:
            return RouteDecision("remote", "model")
        if rules.keywords:
            text = fold(question(payload))
            for keyword in rules.keywords:
                if fold(keyword) in text:
                    return RouteDecision("remote", f"keyword:{keyword}")
    if rules.fallback and not local.ready:
        return RouteDecision("remote", "fallback:not-ready")
    if rules.fallback and local.at_capacity:
        return RouteDecision("remote", "fallback:capacity")
    return RouteDecision("local", "default")


def question(payload: Mapping[str, Any]) -> str:
    """The text the keyword rules look at: the last user message of a chat (its text parts
    joined), or a completion's prompt (the last one, when several); "" when there is none."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
        return ""
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        prompt = next((p for p in reversed(prompt) if isinstance(p, str)), "")
    return prompt if isinstance(prompt, str) else ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def routed_remote(scope: Scope) -> bool:
    """True when `RouteMiddleware` sent this request to the remote (admission lets it pass)."""
    decision = scope.get("state", {}).get(SCOPE_KEY)
    return decision is not None and decision.route == "remote"


def response_headers(decision: RouteDecision, header: str = DEFAULT_ROUTE_HEADER) -> list[tuple[bytes, bytes]]:
    """`X-Student-Route: remote` and `X-Student-Route-Reason: keyword:t%E1%BA%A1i%20sao`
    (HTTP headers are Latin-1: the reason is percent-encoded UTF-8)."""
    name = header.lower().encode("latin-1")
    return [(name, decision.route.encode()), (name + b"-reason", quote(decision.reason, safe=":-").encode())]


class RouteMiddleware:
    """ASGI middleware in front of admission control: decide the route of each generation request.

    It reads the body (at most `max_body_bytes`; the endpoint refuses larger ones itself) to see
    the model and the question, hands the same bytes on, puts the decision in
    `scope["state"]["route"]` and adds the route headers to the answer. `local_state` is asked
    after the body is in, with no await before admission control runs, so "would be refused"
    cannot go stale in between.
    """

    def __init__(
        self,
        app: ASGIApp,
        rules: RoutingRules,
        local_state: Callable[[], LocalState],
        max_body_bytes: int,
    ):
        self._app = app
        self._rules = rules
        self._local_state = local_state
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTED_PATHS:
            await self._app(scope, receive, send)
            return
        messages, body = await self._read(receive)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            decision = decide(self._rules, headers, _json_object(body), self._local_state())
        except BadRouteHeaderError as exc:
            await error_response(400, str(exc))(scope, _replay(messages, receive), send)
            return
        scope.setdefault("state", {})[SCOPE_KEY] = decision
        extra = response_headers(decision, self._rules.header)

        async def send_with_route(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self._app(scope, _replay(messages, receive), send_with_route)

    async def _read(self, receive: Receive) -> tuple[list[Message], bytes | None]:
        """The body's messages as received, and the body (None when over the limit: not all read)."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            size += len(message.get("body", b""))
            if size > self._max_body_bytes:
                return messages, None
            if not message.get("more_body", False):
                return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out `messages` again, then the rest from the client."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None
