"""Refuse bad request bodies at the gateway, before they cost an upstream round trip.

Only the OpenAI fields are checked (types, ranges, message roles); every other key (vLLM's
sampling extras: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, ...) is allowed and left
alone, and the client's original bytes are what goes upstream. A refusal is a `RequestError`:
an OpenAI-shaped 4xx whose `param` names the field, e.g. "messages[1].role".

The same pydantic models describe the request bodies in the gateway's OpenAPI spec (`openapi_body`).
This runs on every request: checking a typical chat body costs about 10 µs (json.loads is paid once, before).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, ValidationError
from pydantic_core import ErrorDetails
from starlette.responses import JSONResponse

from server.gateway.errors import error_response

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's limit on choices per request; more would only queue up in vLLM
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff as a JSON escape
_INSTANCE_OF = re.compile(r" or instance of \w+")  # pydantic's wording, meaningless to a client


@dataclass(frozen=True, slots=True)
class RequestError:
    """Why the gateway refuses a request: an HTTP status, a message and the offending field."""

    status: int
    message: str
    param: str | None = None

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param)


class _Open(BaseModel):
    """Known fields are checked, unknown ones (vLLM's extras) pass; NaN and ±inf are refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextPart(_Open):
    type: Literal["text"]
    text: str


class OtherPart(_Open):
    """Image, audio, file, refusal... parts: vLLM checks what the model can take."""

    type: str


def _part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "text" if kind == "text" else "other"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[OtherPart, Tag("other")], Discriminator(_part_kind)
]


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # None is OpenAI's "no content" (an assistant turn that only calls tools).
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage on every chunk


class _Sampling(_Open):
    """Fields both endpoints share; ranges are OpenAI's (vLLM enforces the same ones)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; at most the model's context")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    # Strict: the proxy relays a stream only for a JSON `true` (vLLM would also take "true").
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions (OpenAI's fields; any vLLM extra is accepted as is)."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool | None = None


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI's fields; any vLLM extra is accepted as is)."""

    # Optional because vLLM also takes `prompt_embeds` instead; it answers 400 when both lack.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] | None = None
    echo: bool | None = None
    suffix: str | None = None


def check_unicode(body: bytes, payload: dict[str, Any]) -> RequestError | None:
    """400 for a string holding an unpaired UTF-16 surrogate (a lone `\\ud800` escape).

    Python's JSON parser lets them through, but they are not text: vLLM's tokenizer refuses
    them and re-encoding the body (to ask vLLM for usage in a stream) would crash. Only bodies
    with such an escape in them are looked at closely (emoji escaped as pairs are fine).
    """
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    path = _lone_surrogate_at(payload, "")
    if path is None:
        return None
    message = "unpaired UTF-16 surrogate escape; strings must be valid Unicode."
    return RequestError(400, f"Invalid '{path}': {message}" if path else message[0].upper() + message[1:], path or None)


def _lone_surrogate_at(node: Any, path: str) -> str | None:
    """Where in `node` a string (or key) cannot be encoded as UTF-8, as a `param` path; None if nowhere."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(node, dict):
        for key, value in node.items():
            found = _lone_surrogate_at(key, path) if isinstance(key, str) else None
            found = found if found is not None else _lone_surrogate_at(value, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found = _lone_surrogate_at(value, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def validate_chat(payload: dict[str, Any]) -> ChatRequest | RequestError:
    """The parsed chat body as a `ChatRequest`, or the first reason to refuse it."""
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        return _first_error(exc, payload)


def validate_completion(payload: dict[str, Any]) -> CompletionRequest | RequestError:
    """The parsed completion body as a `CompletionRequest`, or the first reason to refuse it."""
    try:
        return CompletionRequest.model_validate(payload)
    except ValidationError as exc:
        return _first_error(exc, payload)


@dataclass(frozen=True, slots=True)
class ServedModels:
    """What the upstream serves: model name → context length in tokens (None: not reported)."""

    max_model_len: Mapping[str, int | None]
    default: str | None  # the model vLLM answers with when a request names none (its first)


def check_served(request: ChatRequest | CompletionRequest, served: ServedModels | None) -> RequestError | None:
    """404 for a model the upstream does not serve; 400 for more new tokens than its context.

    `served` None means the list is not known (upstream unreachable): nothing is refused then.
    Whether prompt + max_tokens fits is left to vLLM, which has the tokenizer.
    """
    if served is None:
        return None
    name = request.model
    if name is not None and name not in served.max_model_len:
        known = ", ".join(served.max_model_len) or "none"
        return RequestError(404, f"The model `{name}` does not exist (served: {known}).", "model")
    chosen = served.default if name is None else name
    context = None if chosen is None else served.max_model_len.get(chosen)
    if context is None:
        return None
    for field in ("max_tokens", "max_completion_tokens"):
        if field not in type(request).model_fields:
            continue  # an unknown extra on this endpoint: vLLM ignores it
        wanted = getattr(request, field)
        if wanted is not None and wanted > context:
            return RequestError(
                400, f"`{field}` is {wanted}, more than the model's context of {context} tokens.", field
            )
    return None


def parse_model_list(body: bytes) -> ServedModels | None:
    """Read vLLM's GET /v1/models answer (`{"data": [{"id", "max_model_len"}]}`); None if unreadable."""
    try:
        entries = json.loads(body)["data"]
        lengths: dict[str, int | None] = {}
        for entry in entries:
            length = entry.get("max_model_len")
            lengths[str(entry["id"])] = length if isinstance(length, int) and length > 0 else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return ServedModels(lengths, next(iter(lengths), None))


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting `model` as the JSON request body, with no `$ref`s left.

    The handlers read the raw body themselves (it is forwarded as is), so FastAPI does not
    know the model; inlining keeps the schema self-contained without touching components.
    """
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(schema, definitions)}},
        }
    }


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    return node


def _first_error(exc: ValidationError, payload: Any) -> RequestError:
    """The deepest problem (the most precise `param`); a union's alternatives are listed together."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    located = [(field_path(error, payload), _INSTANCE_OF.sub("", error["msg"])) for error in errors]
    param = max((path for path, _ in located), key=lambda path: -1 if path is None else len(path))
    messages = list(dict.fromkeys(message for path, message in located if path == param))
    message = " or ".join(messages[:1] + [m[0].lower() + m[1:] for m in messages[1:]])
    return RequestError(400, f"Invalid '{param}': {message}." if param else f"{message}.", param)


def field_path(error: ErrorDetails, payload: Any) -> str | None:
    """`("messages", 1, "role")` → "messages[1].role", walking the payload itself.

    pydantic puts union-member tags ("str", "list[...]", "text") in `loc`; walking the actual
    data skips whatever is not a key or index there. A missing field is named last.
    """
    parts: list[str] = []
    node = payload
    loc = error["loc"]
    for position, step in enumerate(loc):
        if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
            parts.append(f"[{step}]")
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict):
            if step in node:
                parts.append(f".{step}")
                node = node[step]
            elif position == len(loc) - 1 and error["type"] == "missing":
                parts.append(f".{step}")
    return "".join(parts).removeprefix(".") or None
