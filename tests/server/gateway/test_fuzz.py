"""Property-based fuzzing of the running gateway from its own OpenAPI spec (Schemathesis).

Every operation in /openapi.json gets schema-valid and schema-violating requests (plus raw
bytes and arbitrary JSON for the two POST endpoints); whatever the input, the gateway must never
answer 5xx, and every error must be the OpenAI JSON shape. Valid bodies reach the real vLLM, so
the test caps their cost (few new tokens, few choices): about 1,000 requests in ~30 s on a 2-core
box; past FUZZ_BUDGET_S of fuzzing the remaining examples are skipped (a slow box fuzzes less,
it does not fail). Hypothesis draws new examples on every run (no example database); a failure
prints the seed that reproduces it.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support import Stack, http_get

MAX_NEW_TOKENS = 4
MAX_CHOICES = 2
FUZZ_BUDGET_S = 90.0
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# (path, method, generation mode, examples) for every operation of the gateway's spec;
# test_every_operation_is_fuzzed keeps the list honest. Invalid input exists only where the
# spec constrains something: the two request bodies and /stats' `window`.
PLAN = [
    ("/v1/chat/completions", "POST", POSITIVE, 150),
    ("/v1/chat/completions", "POST", NEGATIVE, 250),
    ("/v1/completions", "POST", POSITIVE, 150),
    ("/v1/completions", "POST", NEGATIVE, 250),
    ("/stats", "GET", POSITIVE, 20),
    ("/stats", "GET", NEGATIVE, 20),
    ("/dashboard/static/{name}", "GET", POSITIVE, 30),
    ("/v1/models", "GET", POSITIVE, 1),
    ("/health", "GET", POSITIVE, 1),
    ("/ready", "GET", POSITIVE, 1),
    ("/metrics", "GET", POSITIVE, 1),
    ("/dashboard", "GET", POSITIVE, 1),
]


@pytest.fixture(scope="module")
def gateway_schema(stack: Stack) -> schemathesis.BaseSchema:
    """The spec the running gateway serves at /openapi.json."""
    return schemathesis.openapi.from_url(f"{stack.url}/openapi.json")


@pytest.fixture(scope="module")
def fuzz_clock() -> dict[str, float]:
    """Wall time the fuzzing took (generating, sending, checking), summed over the module, and requests sent."""
    return {"spent_s": 0.0, "cases": 0}


def test_every_operation_is_fuzzed(gateway_schema: schemathesis.BaseSchema) -> None:
    served = {(op.ok().path, op.ok().method.upper()) for op in gateway_schema.get_all_operations()}
    assert served == {(path, method) for path, method, _, _ in PLAN}


# Schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) fails on pytest 9
# ("'Function' object has no attribute '_nodeid'"), so each operation's strategy runs under
# Hypothesis directly: same generators, same data.
@pytest.mark.parametrize(
    ("path", "method", "mode", "examples"), PLAN, ids=[f"{m} {p} {mode.value}" for p, m, mode, _ in PLAN]
)
def test_no_input_gets_a_5xx_or_a_non_json_error(
    stack: Stack,
    gateway_schema: schemathesis.BaseSchema,
    fuzz_clock: dict[str, float],
    path: str,
    method: str,
    mode: schemathesis.GenerationMode,
    examples: int,
) -> None:
    operation = gateway_schema[path][method]
    served_model = json.loads(http_get(f"{stack.url}/v1/models")[1])["data"][0]["id"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written under .hypothesis/
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def answers_sanely(case: schemathesis.Case) -> None:
        if over_budget(fuzz_clock, started):
            return
        if mode is POSITIVE:
            name_served_model(case, served_model)
        keep_cheap(case)
        response = case.call(base_url=stack.url, timeout=60)
        fuzz_clock["cases"] += 1
        assert response.status_code < 500, describe(case, response)
        if response.status_code >= 400:
            assert_openai_error(case, response)

    started = time.monotonic()
    try:
        answers_sanely()
    finally:
        fuzz_clock["spent_s"] += time.monotonic() - started


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_no_raw_body_gets_a_5xx_or_a_non_json_error(stack: Stack, fuzz_clock: dict[str, float], path: str) -> None:
    """Bodies the spec cannot describe: arbitrary bytes, any JSON value, objects with odd keys."""
    bodies = st.binary(max_size=300) | JSON_VALUES.map(lambda value: json.dumps(value).encode())

    @given(body=bodies)
    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def answers_sanely(body: bytes) -> None:
        if over_budget(fuzz_clock, started):
            return
        connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            content = response.read()
        finally:
            connection.close()
        fuzz_clock["cases"] += 1
        what = f"POST {path} {body[:300]!r} -> {response.status} {content[:300]!r}"
        assert response.status < 500, what
        if response.status >= 400:
            assert response.getheader("content-type", "").startswith("application/json"), what
            assert set(json.loads(content)["error"]) == {"message", "type", "param", "code"}, what

    started = time.monotonic()
    try:
        answers_sanely()
    finally:
        fuzz_clock["spent_s"] += time.monotonic() - started


def over_budget(fuzz_clock: dict[str, float], started_s: float) -> bool:
    """True once the module's fuzzing has used FUZZ_BUDGET_S (this test's time included)."""
    return fuzz_clock["spent_s"] + time.monotonic() - started_s > FUZZ_BUDGET_S


def name_served_model(case: schemathesis.Case, model: str) -> None:
    """A valid body names the served model: a random name only ever tests the 404 (test_validation does)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = model


def keep_cheap(case: schemathesis.Case) -> None:
    """Few new tokens and choices for whatever reaches vLLM: the tiny random model rarely stops.

    The gateway coerces like vLLM does ("8" is 8), so numeric strings are capped too.
    """
    body = case.body
    if case.method.upper() != "POST" or not isinstance(body, dict):
        return
    token_fields = [field for field in ("max_tokens", "max_completion_tokens") if field in body]
    for field in token_fields:
        if _number(body[field]) > MAX_NEW_TOKENS:
            body[field] = MAX_NEW_TOKENS
    if not token_fields:
        body["max_tokens"] = MAX_NEW_TOKENS
    if _number(body.get("n")) > MAX_CHOICES:
        body["n"] = MAX_CHOICES


def _number(value: Any) -> float:
    """`value` as a number if the gateway could read it as one, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        return float(value)
    except ValueError:
        return 0


def assert_openai_error(case: schemathesis.Case, response: Any) -> None:
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), describe(case, response)
    try:
        body = json.loads(response.content)
    except ValueError:
        pytest.fail(f"error body is not JSON: {describe(case, response)}")
    assert isinstance(body, dict) and set(body) == {"error"}, describe(case, response)
    assert set(body["error"]) == {"message", "type", "param", "code"}, describe(case, response)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], describe(case, response)


def describe(case: schemathesis.Case, response: Any) -> str:
    return (
        f"{case.method} {case.formatted_path} body={case.body!r:.600} query={case.query!r}"
        f" -> {response.status_code} {response.content[:600]!r}"
    )
