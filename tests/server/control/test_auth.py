"""API keys, per-key rate limits and who may watch: units, then a real gateway over HTTP."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from server.accounting.ledger import read_requests
from server.control.auth import (
    AccessMiddleware,
    KeyFileError,
    RateLimiter,
    TokenLimiter,
    key_name,
    load_keys,
    parse_keys,
)
from server.gateway.app import create_app
from server.runtime.settings import Settings
from server.telemetry.request_record import RequestRecord
from tests.support import Stack, http_get, running_stack

SHOP_KEY = "sk-shop-0123456789abcdef"
OPS_KEY = "sk-ops-fedcba9876543210"


def test_keys_are_kept_as_digests_and_matched_by_name() -> None:
    digests = parse_keys([f"shop = {SHOP_KEY}", "# a comment", "", f"ops={OPS_KEY}"], "test")
    assert sorted(digests.values()) == ["ops", "shop"]
    assert all(SHOP_KEY.encode() not in digest for digest in digests)
    assert (key_name(digests, SHOP_KEY), key_name(digests, OPS_KEY), key_name(digests, "sk-nope")) == (
        "shop",
        "ops",
        None,
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [("shop", "expected name=key"), ("=" + SHOP_KEY, "expected name=key"), ("shop=short", "at least 16")],
)
def test_bad_key_entries_say_which_and_never_echo_the_key(line: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=problem) as caught:
        parse_keys([line], "keys.txt")
    key = line.partition("=")[2]
    assert "keys.txt, entry 1" in str(caught.value) and (not key or key not in str(caught.value))


def test_duplicate_keys_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="same key as shop"):
        parse_keys([f"shop={SHOP_KEY}", f"copy={SHOP_KEY}"], "keys.txt")
    with pytest.raises(KeyFileError, match="cannot read the API key file"):
        load_keys(None, tmp_path / "missing.txt")


def test_rate_limiter_refills_continuously() -> None:
    limiter = RateLimiter(per_minute=2)
    assert [limiter.admit("a", 0.0), limiter.admit("a", 0.0)] == [0.0, 0.0]
    assert limiter.admit("a", 0.0) == pytest.approx(30.0)  # one request every 30 s
    assert limiter.admit("b", 0.0) == 0.0  # per key
    assert limiter.admit("a", 30.0) == 0.0


def test_token_limiter_refuses_at_the_limit_until_enough_of_the_window_expires() -> None:
    limiter = TokenLimiter(per_minute=100)
    limiter.add("a", 60, now_s=0.0)
    assert limiter.admit("a", 1.0) == 0.0  # 60 < 100
    limiter.add("a", 40, now_s=10.0)  # admitted under the limit, finished at it
    assert limiter.admit("a", 20.0) == pytest.approx(40.0)  # the 60 tokens of t=0 expire at t=60
    assert limiter.admit("a", 59.5) == pytest.approx(0.5)
    assert limiter.admit("a", 60.0) == 0.0 and limiter.tokens_in_window("a", 60.0) == 40


def test_token_limiter_retry_after_waits_for_as_many_entries_as_needed() -> None:
    limiter = TokenLimiter(per_minute=100)
    for at_s, tokens in ((0.0, 10), (5.0, 10), (10.0, 100)):
        limiter.add("a", tokens, at_s)
    # 120 in the window: after t=0 and t=5 expire 100 remain, still at the limit; so until t=10 + 60.
    assert limiter.admit("a", 30.0) == pytest.approx(40.0)
    assert limiter.admit("a", 65.0) == pytest.approx(5.0) and limiter.tokens_in_window("a", 65.0) == 100
    assert limiter.admit("a", 70.0) == 0.0


def test_token_limiter_keeps_keys_apart_and_forgets_what_expired() -> None:
    limiter = TokenLimiter(per_minute=50)
    for k in range(10):
        limiter.add("a", 10, now_s=float(k))
    assert limiter.admit("a", 10.0) > 0 and limiter.admit("b", 10.0) == 0.0  # per key
    limiter.add("b", 0, now_s=10.0)  # nothing used: nothing kept
    assert limiter.tokens_in_window("b", 10.0) == 0
    assert limiter.admit("a", 70.0) == 0.0  # every entry older than 60 s is gone...
    assert limiter._spent == {} and limiter._totals == {}  # ...and so is the idle key: memory stays bounded


def test_token_limiter_charges_a_finished_record_to_its_key() -> None:
    limiter = TokenLimiter(per_minute=30)
    record = RequestRecord("/v1/chat/completions", "http://up", stream=True, key_name="shop")
    record.prompt_tokens, record.completion_tokens, record.finished_s = 20, 10, 5.0
    limiter.charge(record)
    anonymous = RequestRecord("/v1/completions", "gateway", stream=False)  # refused before a key was known
    anonymous.prompt_tokens, anonymous.finished_s = 99, 5.0
    limiter.charge(anonymous)
    assert limiter.tokens_in_window("shop", 6.0) == 30 and limiter.admit("shop", 6.0) == pytest.approx(59.0)


def test_over_the_token_limit_is_a_429_with_retry_after_before_the_request_limit_is_touched() -> None:
    tokens = TokenLimiter(per_minute=30)
    middleware = AccessMiddleware(
        app=None,
        digests={},
        requests_per_minute=1,
        token_limiter=tokens,
    )
    assert middleware._check_api({"path": "/v1/chat/completions"}) is None  # the one request of this minute
    tokens.add("anonymous", 30, now_s=time.monotonic())
    refusal = middleware._check_api({"path": "/v1/chat/completions"})
    body = json.loads(refusal.body)
    assert refusal.status_code == 429 and 59 <= int(refusal.headers["Retry-After"]) <= 60
    assert body["error"]["type"] == "rate_limit_error" and "30 tokens" in body["error"]["message"]
    assert "per minute" in body["error"]["message"] and "'anonymous'" in body["error"]["message"]


def test_a_token_limit_without_telemetry_is_a_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.gateway.app"):
        create_app(Settings(rate_limit_tpm=1000, telemetry=False))
    assert "tokens/minute limit (1000) NOT enforced" in caplog.text and "telemetry" in caplog.text


def test_localhost_only_observability_refuses_other_clients() -> None:
    middleware = AccessMiddleware(app=None, digests={}, observability="localhost")
    assert middleware._check_observer({"path": "/stats", "client": ("10.0.0.5", 5000)}).status_code == 403
    assert middleware._check_observer({"path": "/stats", "client": ("127.0.0.1", 5000)}) is None
    assert middleware._check_observer({"path": "/metrics", "client": ("::1", 5000)}) is None


@pytest.fixture(scope="module")
def keyed_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway in front of the session's vLLM that needs keys, limits each key to 3 requests/min
    and shows /metrics and /stats only with a key."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "keys.txt").write_text(f"# shop's keys\nshop={SHOP_KEY}\n")
    with running_stack(
        [
            "--upstream",
            stack.vllm_url,
            "--api-keys-file",
            str(folder / "keys.txt"),
            "--rate-limit-rpm",
            "3",
            "--observability",
            "key",
            "--access-log",
        ],
        folder / "gateway.log",
        env={"STUDENT_API_KEYS": f"ops={OPS_KEY}"},
    ) as gateway:
        yield gateway


def chat(url: str, key: str | None) -> tuple[int, Message, dict]:
    body = {"model": "student", "max_tokens": 2, "messages": [{"role": "user", "content": "Xin chào"}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def test_v1_needs_a_key_and_each_key_has_its_own_limit(keyed_gateway: Stack) -> None:
    status, headers, body = chat(keyed_gateway.url, None)
    assert status == 401 and body["error"]["type"] == "authentication_error" and "Bearer" in headers["WWW-Authenticate"]
    status, _, body = chat(keyed_gateway.url, "sk-wrong-0123456789abcdef")
    assert (status, body["error"]["message"]) == (401, "invalid API key")
    assert [chat(keyed_gateway.url, SHOP_KEY)[0] for _ in range(3)] == [200, 200, 200]
    status, headers, body = chat(keyed_gateway.url, SHOP_KEY)
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and 1 <= int(headers["Retry-After"]) <= 20
    assert chat(keyed_gateway.url, OPS_KEY)[0] == 200  # the other key (from the environment) is not limited by it
    assert SHOP_KEY not in keyed_gateway.log() and OPS_KEY not in keyed_gateway.log()


def test_observability_with_key_mode(keyed_gateway: Stack) -> None:
    assert http_get(f"{keyed_gateway.url}/metrics")[0] == 401
    request = urllib.request.Request(f"{keyed_gateway.url}/stats", headers={"Authorization": f"Bearer {OPS_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())["requests"]["total"] >= 0
    assert http_get(f"{keyed_gateway.url}/health")[0] == 200  # liveness stays open for orchestrators


TOKENS_PER_MINUTE = 60


@pytest.fixture(scope="module")
def tpm_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway in front of the session's vLLM that allows each key 60 tokens a minute."""
    folder = tmp_path_factory.mktemp("tpm")
    with running_stack(
        ["--upstream", stack.vllm_url, "--rate-limit-tpm", str(TOKENS_PER_MINUTE)],
        folder / "gateway.log",
        env={"STUDENT_API_KEYS": f"shop={SHOP_KEY},ops={OPS_KEY}"},
    ) as gateway:
        yield gateway


def test_each_key_is_refused_once_its_answers_reached_the_token_limit(tpm_gateway: Stack) -> None:
    spent: list[int] = []  # tokens of each answered request, from its usage
    while True:
        status, headers, body = chat(tpm_gateway.url, SHOP_KEY)
        if status != 200:
            break
        spent.append(body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"])
        assert len(spent) < 20, f"never refused after {sum(spent)} tokens"
    # Charged as each answer finished: admitted while under the limit, refused from the one that reached it.
    assert sum(spent[:-1]) < TOKENS_PER_MINUTE <= sum(spent), spent
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
    error = body["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", 429)
    assert f"{TOKENS_PER_MINUTE} tokens (prompt + completion) per minute" in error["message"]
    assert "'shop'" in error["message"]
    assert chat(tpm_gateway.url, SHOP_KEY)[0] == 429  # still refused: refusals cost nothing, but free nothing
    assert chat(tpm_gateway.url, OPS_KEY)[0] == 200  # the other key has its own minute
    # The ledger names each answered request's key (never the key itself); refusals are not in it.
    assert [row.key_name for row in read_requests(tpm_gateway.ledger_path)] == ["shop"] * len(spent) + ["ops"]
