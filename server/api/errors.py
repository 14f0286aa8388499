"""OpenAI-style error bodies and the exception handlers that produce them.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status. User mistakes are 4xx; a 500 means a bug (it is logged with its traceback and the server
keeps serving).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from mcserve.server.errors import AuthenticationError, InvalidRequestError, MCServeError, NotFoundError, QueueFullError

logger = logging.getLogger("mcserve.api")

# pydantic names union members in error locations ("prompt", "list[int]", 0); these are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


class EngineNotReadyError(MCServeError):
    """The model is still loading (503, Retry-After)."""

    http_status = 503
    error_type = "server_error"

    def __init__(self, message: str = "the model is still loading", *, retry_after_s: int = 5) -> None:
        super().__init__(message, code="model_loading")
        self.retry_after_s = retry_after_s


class PayloadTooLargeError(MCServeError):
    http_status = 413
    error_type = "invalid_request_error"

    def __init__(self, limit: int, declared: int | None) -> None:
        """`declared`: the Content-Length, if that is how we know (else the bytes received passed the limit)."""
        got = f"{declared} bytes" if declared is not None else f"more than {limit} bytes"
        super().__init__(f"request body too large: {got} (limit {limit} bytes)", code="request_too_large")


class UnsupportedMediaTypeError(MCServeError):
    http_status = 415
    error_type = "invalid_request_error"

    def __init__(self, media_type: str | None) -> None:
        got = f"'{media_type[:100]}'" if media_type else "none"
        super().__init__(f"Content-Type must be application/json, got {got}", code="unsupported_media_type")


class HeadersTooLargeError(MCServeError):
    http_status = 431
    error_type = "invalid_request_error"

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"request headers too large: {size} bytes (limit {limit} bytes)", code="headers_too_large")


class ServerDrainingError(MCServeError):
    """The server is shutting down: in-flight requests finish, new ones go to another replica."""

    http_status = 503
    error_type = "server_error"

    def __init__(self, message: str = "the server is shutting down; retry on another replica") -> None:
        super().__init__(message, code="server_draining")
        self.retry_after_s = 1


class InternalServerError(MCServeError):
    http_status = 500
    error_type = "internal_server_error"


def error_headers(exc: MCServeError) -> dict[str, str]:
    retry = getattr(exc, "retry_after_s", None)
    out = {"Retry-After": str(retry)} if retry is not None else {}
    if isinstance(exc, AuthenticationError):
        out["WWW-Authenticate"] = 'Bearer realm="mcserve"'
    return out


def error_response(exc: MCServeError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=error_headers(exc))


async def send_error(send: Send, exc: MCServeError, extra_headers: Mapping[str, str] | None = None) -> None:
    """Answer with `exc` from pure-ASGI middleware (before the app has started a response)."""
    body = json.dumps(exc.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    more = {**error_headers(exc), **(extra_headers or {})}
    headers += [(k.lower().encode(), v.encode()) for k, v in more.items()]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _is_tag(part: str | int) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper())


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; union-member tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part):
            out += ("." if out else "") + part
    return out or None


def _union(loc: tuple) -> tuple[tuple, str | None]:
    """The location before the first union tag, and that tag (None if `loc` has none)."""
    for i, part in enumerate(loc):
        if _is_tag(part):
            return tuple(loc[:i]), str(part)
    return tuple(loc), None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def invalid_request_from_validation(errors: list[Mapping]) -> InvalidRequestError:
    """Turn pydantic's error list into one 400 that names the first bad field."""
    if not errors:
        return InvalidRequestError("invalid request body")
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first["msg"]
        return InvalidRequestError(f"request body is not valid JSON: {detail}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequestError("request body must be a JSON object", code="invalid_json")
    where, tag = _union(tuple(first["loc"]))
    param = _param(where)
    if tag is not None:  # a union field: pydantic reports one error per member type
        tags = dict.fromkeys(t for e in errors for w, t in [_union(tuple(e["loc"]))] if w == where and t)
        value = _short(first.get("input")) if len(first["loc"]) == len(where) + 1 else "the value"
        msg = f"{param}: {value} matches none of the accepted types ({', '.join(tags)})"
    elif first["type"] == "missing":
        msg = f"{param}: field required"
    else:
        msg = f"{param}: {first['msg']} (got {_short(first.get('input'))})"
    return InvalidRequestError(msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for expected errors. Anything else is caught by `ErrorGuardMiddleware` (500)."""

    async def on_mcserve_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, MCServeError)
        if isinstance(exc, QueueFullError):
            logger.info("rejected: %s", exc.message)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, (ValidationError, RequestValidationError))
        return error_response(invalid_request_from_validation(list(exc.errors())))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err: MCServeError = NotFoundError(
                f"no such endpoint: {request.method} {request.url.path}", code="not_found"
            )
        else:  # 405 and the like keep their status, with an OpenAI-style body
            err = InvalidRequestError(str(exc.detail))
        return JSONResponse(err.to_dict(), status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(MCServeError, on_mcserve_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
