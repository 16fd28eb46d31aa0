"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, whoever failed.

Official OpenAI clients read this shape to raise the right exception, so the gateway's own
errors and vLLM's (whose shape has varied between releases) are all turned into it here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorEnvelope(BaseModel):
    """The body of every error answer (documented in the OpenAPI spec as such)."""

    error: ErrorDetail


# OpenAPI `responses` for the endpoints that take a request body: what the gateway refuses itself.
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorEnvelope, "description": "malformed JSON or an invalid field (`param` names it)"},
    401: {"model": ErrorEnvelope, "description": "missing or wrong API key"},
    404: {"model": ErrorEnvelope, "description": "the model is not served upstream (`param` is `model`)"},
    413: {"model": ErrorEnvelope, "description": "request body larger than the limit"},
    429: {"model": ErrorEnvelope, "description": "over the rate limit or the queue: retry after `Retry-After`"},
    503: {"model": ErrorEnvelope, "description": "vLLM is not answering: retry after `Retry-After`"},
}


def error_body(
    status: int, message: str, type_: str | None = None, param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """The OpenAI error object for an HTTP status."""
    return {
        "error": {
            "message": message,
            "type": type_ or ERROR_TYPES.get(status, "api_error"),
            "param": param,
            "code": status if code is None else code,
        }
    }


def error_response(
    status: int,
    message: str,
    type_: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param), status_code=status, headers=headers)


def normalize_upstream_error(status: int, body: bytes) -> dict[str, Any]:
    """Turn whatever error body the upstream sent into the OpenAI shape, keeping its message."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()[:500]
        return error_body(status, text or f"upstream returned HTTP {status}")
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return error_body(status, str(inner["message"]), inner.get("type"), inner.get("param"), inner.get("code"))
        if "message" in payload:
            return error_body(
                status, str(payload["message"]), payload.get("type"), payload.get("param"), payload.get("code")
            )
        if "detail" in payload:
            return error_body(status, json.dumps(payload["detail"], ensure_ascii=False))
    return error_body(status, f"upstream returned HTTP {status}")


def install_error_handlers(app: FastAPI) -> None:
    """Make the framework's own errors (404 route, 405, query validation, a crash) OpenAI-shaped too."""

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(400, first.get("msg", "invalid request"), param=param)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the usual shape, not text/plain.
        logger.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(500, "internal error in the gateway (see its log)")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
