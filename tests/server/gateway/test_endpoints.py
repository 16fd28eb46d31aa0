"""Health and readiness: the gateway's own liveness is independent of the upstream's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support import Stack, free_port, http_get, post_json, start_stack


@pytest.fixture(scope="module")
def orphan_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway fronting an upstream address where nothing listens."""
    dead = free_port()
    gateway = start_stack(["--upstream", f"http://127.0.0.1:{dead}/v1"], tmp_path_factory.mktemp("orphan") / "log")
    try:
        assert_gateway_up(gateway)
        yield gateway
    finally:
        gateway.stop()


def assert_gateway_up(gateway: Stack) -> None:
    from tests.support import wait_for

    assert wait_for(lambda: gateway.process.poll() is None and _health(gateway) == 200, 60), gateway.log()


def _health(gateway: Stack) -> int:
    try:
        return http_get(f"{gateway.url}/health", timeout_s=1)[0]
    except OSError:
        return 0


def test_ready_when_vllm_answers(stack: Stack) -> None:
    status, body = http_get(f"{stack.url}/ready")
    assert status == 200
    assert json.loads(body) == {
        "status": "ready",
        "upstream": stack.vllm_url,
        "replicas": [{"url": stack.vllm_url, "healthy": True, "reason": None}],
    }


def test_health_says_alive_even_without_upstream(orphan_gateway: Stack) -> None:
    status, body = http_get(f"{orphan_gateway.url}/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_ready_is_503_with_reason_without_upstream(orphan_gateway: Stack) -> None:
    status, body = http_get(f"{orphan_gateway.url}/ready")
    error = json.loads(body)["error"]
    assert status == 503
    assert error["type"] == "service_unavailable" and "unreachable" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_requests_get_openai_503_when_upstream_is_down(orphan_gateway: Stack, stream: bool) -> None:
    status, body = post_json(
        f"{orphan_gateway.url}/v1/chat/completions",
        {"model": "student", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
    )
    assert status == 503
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "upstream unavailable" in body["error"]["message"]
    assert _health(orphan_gateway) == 200


def test_unknown_route_is_openai_shaped_404(orphan_gateway: Stack) -> None:
    status, body = http_get(f"{orphan_gateway.url}/v1/nothing-here")
    assert status == 404
    assert json.loads(body)["error"]["type"] == "not_found_error"
