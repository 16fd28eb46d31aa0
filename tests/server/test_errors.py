from __future__ import annotations

import json

import pytest

from server.errors import error_body, normalize_upstream_error


def test_error_body_has_the_openai_fields() -> None:
    assert error_body(503, "down") == {
        "error": {"message": "down", "type": "service_unavailable", "param": None, "code": 503}
    }


@pytest.mark.parametrize(
    "upstream",
    [
        {"error": {"message": "bad model", "type": "NotFoundError", "param": "model", "code": 404}},
        {"object": "error", "message": "bad model", "type": "NotFoundError", "param": "model", "code": 404},
    ],
    ids=["nested", "flat-legacy-vllm"],
)
def test_vllm_error_shapes_become_openai_shape(upstream: dict) -> None:
    assert normalize_upstream_error(404, json.dumps(upstream).encode()) == {
        "error": {"message": "bad model", "type": "NotFoundError", "param": "model", "code": 404}
    }


def test_fastapi_detail_is_kept_as_message() -> None:
    body = normalize_upstream_error(422, b'{"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}')
    assert body["error"]["type"] == "invalid_request_error"
    assert "field required" in body["error"]["message"]


@pytest.mark.parametrize("raw", [b"Internal Server Error", b"", b"\xff\xfe", b"[1]"])
def test_non_json_or_odd_upstream_errors_still_give_an_openai_body(raw: bytes) -> None:
    body = normalize_upstream_error(500, raw)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["code"] == 500
