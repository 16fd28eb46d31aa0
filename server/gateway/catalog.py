"""Which models the upstream serves, and their context lengths, for refusing bad requests early.

Learned from vLLM's GET /v1/models and cached. A request naming a model not in the cache
refreshes it (vLLM may have been restarted with another model), but at most once per
`min_refresh_s`, so a flood of bad names cannot become a flood of upstream calls. When the list
cannot be fetched the answer is "unknown" and nothing is refused for model reasons: the request
goes upstream, and an upstream that is down turns into a 503 there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from server.gateway.validation import ServedModels, parse_model_list

# Returns the body of the upstream's GET /v1/models, or None when it did not answer 200.
FetchModels = Callable[[], Awaitable[bytes | None]]


class ModelCatalog:
    """The upstream's served models, refreshed on a miss or when older than `max_age_s`."""

    def __init__(
        self,
        min_refresh_s: float = 2.0,
        max_age_s: float = 60.0,
        fetch_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._min_refresh_s = min_refresh_s
        self._max_age_s = max_age_s
        self._fetch_timeout_s = fetch_timeout_s
        self._clock = clock
        self._served: ServedModels | None = None
        self._fetched_at = -float("inf")  # last successful fetch, clock seconds
        self._tried_at = -float("inf")  # last attempt, successful or not
        self._lock = asyncio.Lock()

    async def served(self, model: str | None, fetch: FetchModels) -> ServedModels | None:
        """The served models, fresh enough to judge `model` (None: name not given); None if unknown."""
        if self._fresh(model):
            return self._served
        async with self._lock:  # concurrent misses share one fetch
            if not self._fresh(model) and self._clock() - self._tried_at >= self._min_refresh_s:
                await self._refresh(fetch)
        return self._served

    def _fresh(self, model: str | None) -> bool:
        served = self._served
        if served is None or self._clock() - self._fetched_at > self._max_age_s:
            return False
        return model is None or model in served.max_model_len

    async def _refresh(self, fetch: FetchModels) -> None:
        self._tried_at = self._clock()
        try:
            body = await asyncio.wait_for(fetch(), self._fetch_timeout_s)
        except asyncio.TimeoutError:
            body = None
        served = None if body is None else parse_model_list(body)
        self._served = served  # a failed fetch forgets the list: better to forward than to misjudge
        if served is not None:
            self._fetched_at = self._tried_at
