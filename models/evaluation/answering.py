"""Ask a target (any OpenAI-compatible server) every eval question and time each answer.

Requests are plain chat completions: the item's messages, temperature 0, `max_tokens`, not
streamed, at most `concurrency` at a time. The HTTP side (retries of 429/5xx with backoff, the
API key, error texts) is `models.distill.teacher.TeacherClient`, the project's one
OpenAI-compatible client.

Latency is the wall time of the whole answer as this client sees it, in ms. An answer that
needed a retry has the retry's wait in it, so latency percentiles cover first-attempt answers
only (the report counts the retried ones). A request that still fails is kept as an answer with
its `error` and no text: it scores as an empty answer with every fact missing. A 401/403/404
stops the run (every later request would fail the same way).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from models.distill.teacher import (
    RetryPolicy,
    TeacherClient,
    TeacherConfig,
    TeacherError,
    TeacherRejectedError,
    TeacherUnavailableError,
)
from models.evaluation.errors import EvalError
from models.evaluation.eval_set import EvalItem
from server.accounting.tariff import ApiPrice

TEMPERATURE = 0.0
DEFAULT_TIMEOUT_S = 300.0
RETRY = RetryPolicy(max_retries=3, base_delay_s=1.0, max_delay_s=30.0)
PREFLIGHT_CONNECTION_RETRIES = 1  # an unreachable URL is reported in seconds, not after a minute of backoff


def api_base(url: str) -> str:
    """`url` as an OpenAI API base ending in `/v1` (given with or without it)."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EvalError(f"{url!r} is not an http:// or https:// URL")
    return base if base.endswith("/v1") else f"{base}/v1"


def client_error_text(error: Exception) -> str:
    """The client's error without its "teacher" wording (it was written for `student distill`)."""
    return str(error).replace("teacher at ", "", 1).replace("the teacher's reply", "the reply", 1)


@dataclass(frozen=True)
class Target:
    """One server to evaluate. `url` is the API base (…/v1); `root` the server's root, where a
    student-serve gateway has `/stats`. `price` (USD per million tokens) makes its token cost."""

    label: str
    url: str
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    key_env: str | None = None
    price: ApiPrice | None = None
    price_name: str | None = None

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def client_config(
        self, timeout_s: float = DEFAULT_TIMEOUT_S, extra_body: dict[str, Any] | None = None
    ) -> TeacherConfig:
        return TeacherConfig(
            url=self.url,
            model=self.model or "",
            api_key=self.api_key,
            key_env=self.key_env,
            timeout_s=timeout_s,
            retry=RETRY,
            extra_body=extra_body or {},
        )


@dataclass(frozen=True)
class Answer:
    """A target's answer to one item. Times in ms, tokens from the response's `usage` (None
    when the server gave none)."""

    item_id: str
    text: str
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    attempts: int
    error: str | None = None

    @property
    def first_attempt(self) -> bool:
        """Answered without a retry: its latency is the server's, not a backoff wait."""
        return self.error is None and self.attempts == 1


async def resolve_model(target: Target) -> Target:
    """The target with its model: the one given (checked against GET /v1/models when the server
    lists any), else the first listed. `EvalError` when it cannot be reached or refuses."""
    async with TeacherClient(target.client_config(timeout_s=30.0)) as client:
        try:
            served = await client.served_models(max_connection_retries=PREFLIGHT_CONNECTION_RETRIES)
        except TeacherUnavailableError as error:
            raise EvalError(f"cannot reach target {target.label}: {client_error_text(error)}") from None
        except TeacherRejectedError as error:
            raise EvalError(f"target {target.label}: {client_error_text(error)}") from None
    if target.model is not None:
        if served and target.model not in served:
            listed = ", ".join(served)
            raise EvalError(
                f"target {target.label} at {target.url} does not serve {target.model!r} (it serves {listed})"
            )
        return target
    if not served:
        raise EvalError(f"target {target.label} at {target.url} lists no models: give --model {target.label}=NAME")
    return replace(target, model=served[0])


async def answer_items(
    client: TeacherClient,
    items: Sequence[EvalItem],
    max_tokens: int,
    concurrency: int,
    on_answer: Callable[[Answer], None] = lambda answer: None,
) -> list[Answer]:
    """Every item's answer, in item order; `EvalError` on a refusal that no retry can fix."""
    slots = asyncio.Semaphore(concurrency)

    async def one(item: EvalItem) -> Answer:
        async with slots:
            answer = await answer_item(client, item, max_tokens)
        on_answer(answer)
        return answer

    return list(await asyncio.gather(*(one(item) for item in items)))


async def answer_item(client: TeacherClient, item: EvalItem, max_tokens: int) -> Answer:
    started_s = time.perf_counter()
    try:
        reply = await client.chat(item.messages, max_tokens=max_tokens, temperature=TEMPERATURE)
    except TeacherRejectedError as error:
        if error.fatal:
            raise EvalError(client_error_text(error)) from None
        return Answer(item.id, "", None, None, None, None, 1, client_error_text(error))
    except TeacherUnavailableError as error:
        return Answer(item.id, "", None, None, None, None, error.attempts, client_error_text(error))
    except TeacherError as error:
        return Answer(item.id, "", None, None, None, None, 1, client_error_text(error))
    latency_ms = (time.perf_counter() - started_s) * 1000.0
    prompt, completion = (reply.prompt_tokens, reply.completion_tokens) if reply.has_usage else (None, None)
    return Answer(item.id, reply.content, latency_ms, prompt, completion, reply.finish_reason, reply.attempts)
