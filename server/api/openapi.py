"""The served OpenAPI document, generated from the pydantic models the handlers validate with.

The handlers read their bodies themselves (`serving.parse_body`: strict JSON, OpenAI-style 400s), so
FastAPI knows no body; `openapi_document` adds, per route, the request body, the JSON response, the
SSE stream of the generation endpoints (media type `text/event-stream`, each event's `data` a chunk
model, `x-event-data` names it) and the error statuses the server really returns, each with the
OpenAI error body. FastAPI's 422 (never returned: no route takes a typed body) is dropped.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from mcserve.server.api.drain import DRAIN_OPEN_PATHS
from mcserve.server.api.middleware import OPEN_PATHS
from mcserve.server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mcserve.server.api.sessions import SessionDeleted, SessionList, SessionSaved


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error leaves the server in this shape (also as the last event of a failed stream)."""

    error: ErrorDetail


# status -> when it happens (server/errors.py, server/api/errors.py, middleware)
_ERRORS = {
    400: "invalid request: a field, the JSON, the context length, a schema that cannot be compiled, "
         "an invalid Content-Length",
    401: "missing or invalid API key (only when the server has keys)",
    404: "unknown model or session",
    409: "a saved session named by the request cannot be restored (corrupt, truncated, another model or MC"
         " settings)",
    413: "request body over the limit",
    415: "Content-Type is not application/json",
    431: "request headers over the limit",
    500: "internal error (a bug; logged)",
    503: "model loading, engine dead, draining, or waiting queue full (Retry-After)",
}
# What the middleware answers before any handler runs, on every route: an invalid Content-Length (400),
# the body and header limits, the 500 guard; and, off the open paths, the API key and draining.
_EVERY = (400, 413, 431, 500)
# What the handlers themselves add, per route.
_BODY_ERRORS = (400, 404, 409, 415, 503)
_SESSION_ERRORS = (400, 404, 503)

# (path, method) -> (request body, JSON response, SSE chunk, the handler's error statuses)
_ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None, type[BaseModel] | None,
                                     tuple[int, ...]]] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
                                       _BODY_ERRORS),
    ("/v1/completions", "post"): (CompletionRequest, CompletionResponse, CompletionResponse, _BODY_ERRORS),
    ("/tokenize", "post"): (TokenizeRequest, TokenizeResponse, None, _BODY_ERRORS),
    ("/detokenize", "post"): (DetokenizeRequest, DetokenizeResponse, None, _BODY_ERRORS),
    ("/v1/models", "get"): (None, ModelList, None, ()),
    ("/v1/models/{model_id}", "get"): (None, ModelCard, None, (404,)),
    ("/v1/sessions", "get"): (None, SessionList, None, (503,)),
    ("/v1/sessions/{session_id}/save", "post"): (None, SessionSaved, None, _SESSION_ERRORS),
    ("/v1/sessions/{session_id}", "delete"): (None, SessionDeleted, None, _SESSION_ERRORS),
}


def error_statuses(path: str, method: str) -> list[int]:
    """Every error status `method path` can answer, in order."""
    handler = _ROUTES.get((path, method), (None, None, None, ()))[3]
    auth = () if path in OPEN_PATHS else (401,)
    drain = () if path in DRAIN_OPEN_PATHS else (503,)
    return sorted({*_EVERY, *auth, *drain, *handler})


_HEALTH = {
    "type": "object",
    "properties": {
        "status": {"enum": ["loading", "ready", "draining", "dead"]},
        "error": {"type": "string"},
        "watchdog": {"type": "object"},
    },
    "required": ["status"],
}
# GET routes whose bodies are not a protocol model: (description, media type, schema)
_PLAIN: dict[str, tuple[str, str, dict[str, Any]]] = {
    "/health": ("ready", "application/json", _HEALTH),
    "/metrics": ("Prometheus text exposition", "text/plain", {"type": "string"}),
    "/version": ("the package version", "application/json",
                 {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"]}),
}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(ErrorResponse)}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            op["responses"].pop("422", None)
            request, response, chunk, _ = _ROUTES.get((path, method), (None, None, None, ()))
            if request is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
            ok = op["responses"].setdefault("200", {"description": "Successful Response"})
            if response is not None:
                ok["content"] = {"application/json": {"schema": ref(response)}}
            if chunk is not None:
                ok["description"] = ("With `stream: false` one JSON body; with `stream: true` Server-Sent Events: "
                                     f"each event is `data: <{chunk.__name__} JSON>`, the stream ends with "
                                     "`data: [DONE]`, an error after the start is an event with an ErrorResponse.")
                ok["content"]["text/event-stream"] = {"schema": {"type": "string"}, "x-event-data": ref(chunk)}
            for status in error_statuses(path, method):
                op["responses"][str(status)] = {"description": _ERRORS[status], "content": error}
            if path in _PLAIN:
                ok["description"], media, schema = _PLAIN[path]
                ok["content"] = {media: {"schema": schema}}
            if path == "/health":
                op["responses"]["503"] = {"description": "not ready: loading, draining or dead (same body)",
                                          "content": ok["content"]}
    components = spec.setdefault("components", {})
    components["schemas"] = {**{k: v for k, v in components.get("schemas", {}).items()
                                if k not in ("HTTPValidationError", "ValidationError")}, **schemas}
    return spec


def install_openapi(app: FastAPI) -> None:
    """Serve `openapi_document` (built once, at the first request for it)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
