"""API keys, per-key rate limits and who may watch: units, then a real gateway over HTTP."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from server.auth import AccessMiddleware, KeyFileError, RateLimiter, key_name, load_keys, parse_keys
from tests.support import Stack, http_get, start_stack

SHOP_KEY = "sk-shop-0123456789abcdef"
OPS_KEY = "sk-ops-fedcba9876543210"


def test_keys_are_kept_as_digests_and_matched_by_name() -> None:
    digests = parse_keys([f"shop = {SHOP_KEY}", "# a comment", "", f"ops={OPS_KEY}"], "test")
    assert sorted(digests.values()) == ["ops", "shop"]
    assert all(SHOP_KEY.encode() not in digest for digest in digests)
    assert (key_name(digests, SHOP_KEY), key_name(digests, OPS_KEY), key_name(digests, "sk-nope")) == ("shop", "ops", None)


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


def test_localhost_only_observability_refuses_other_clients() -> None:
    middleware = AccessMiddleware(app=None, digests={}, observability="localhost")  # type: ignore[arg-type]
    assert middleware._check_observer({"path": "/stats", "client": ("10.0.0.5", 5000)}).status_code == 403
    assert middleware._check_observer({"path": "/stats", "client": ("127.0.0.1", 5000)}) is None
    assert middleware._check_observer({"path": "/metrics", "client": ("::1", 5000)}) is None


@pytest.fixture(scope="module")
def keyed_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway in front of the session's vLLM that needs keys, limits each key to 3 requests/min
    and shows /metrics and /stats only with a key."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "keys.txt").write_text(f"# shop's keys\nshop={SHOP_KEY}\n")
    gateway = start_stack(
        ["--upstream", stack.vllm_url, "--api-keys-file", str(folder / "keys.txt"), "--rate-limit-rpm", "3",
         "--observability", "key", "--access-log"],
        folder / "gateway.log",
        env={"STUDENT_API_KEYS": f"ops={OPS_KEY}"},
    )
    try:
        gateway.wait_ready(60)
        yield gateway
    finally:
        gateway.stop()


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
