from __future__ import annotations

import json
from typing import Annotated

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from server.gateway.errors import error_body, install_error_handlers, normalize_upstream_error


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


def test_the_frameworks_own_errors_are_openai_shaped() -> None:
    """A query-parameter mistake is a 400 naming it; a crash is a JSON 500, not text/plain."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/window")
    async def window(seconds: Annotated[float, Query(gt=0)] = 1.0) -> dict[str, float]:
        return {"seconds": seconds}

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("bug")

    client = TestClient(app, raise_server_exceptions=False)
    bad = client.get("/window", params={"seconds": "-1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seconds"
    crashed = client.get("/crash")
    assert crashed.status_code == 500 and crashed.headers["content-type"] == "application/json"
    assert crashed.json()["error"]["type"] == "internal_server_error"
    assert client.post("/window").json()["error"]["type"] == "invalid_request_error"  # 405
