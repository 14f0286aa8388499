"""Pure-ASGI middleware: the 500 guard, API-key check and request size limits.

Order, outermost first: ErrorGuard -> CORS (only with --allowed-origins; it answers preflights,
which carry no key) -> ApiKey -> SizeLimit -> FastAPI. The key is checked on headers alone, so an
unauthenticated client cannot make the server buffer a body.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcserve.server.api.errors import HeadersTooLargeError, InternalServerError, PayloadTooLargeError, send_error
from mcserve.server.errors import AuthenticationError, InvalidRequestError

logger = logging.getLogger("mcserve.api")

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})
API_KEY_SCOPE_KEY = "mcserve.api_key"  # the client's bearer token, set on every HTTP scope


class ErrorGuardMiddleware:
    """Turns any exception that escaped the app into a logged 500 (if no response has started);
    the exception is not re-raised, so the server keeps serving."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, InternalServerError(f"internal error: {type(exc).__name__}"))


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on everything but OPEN_PATHS when keys are configured.

    The token is compared with every configured key, always all of them, as SHA-256 digests with
    `hmac.compare_digest`: equal-length inputs and no early exit, so timing reveals neither which key
    nor how much of it matched, nor a key's length. A missing header, another scheme and a wrong key
    get the same 401, with `WWW-Authenticate: Bearer`.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in api_keys]

    def _allowed(self, token: str | None) -> bool:
        given = _digest(token or "")
        ok = False
        for key in self._digests:
            ok |= hmac.compare_digest(given, key)
        return ok and token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        scope[API_KEY_SCOPE_KEY] = token
        if self._digests and scope["path"] not in OPEN_PATHS and not self._allowed(token):
            message = "invalid or missing API key; send 'Authorization: Bearer <key>'"
            await send_error(send, AuthenticationError(message, code="invalid_api_key"))
            return
        await self.app(scope, receive, send)


class SizeLimitMiddleware:
    """Headers first: 431 when all of them together pass `max_header_bytes`. Then reads the whole
    body, counting the bytes received (a lying or absent Content-Length does not help), answers 413
    past `max_bytes` (at once when Content-Length already says so, before reading anything), else
    replays the body to the app. After the body, `receive` goes to the server again so the app still
    sees `http.disconnect`."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))  # ": " + CRLF
        if header_bytes > self.max_header_bytes:
            await send_error(send, HeadersTooLargeError(self.max_header_bytes, header_bytes))
            return
        declared = _content_length(scope)
        if declared == -1:
            await send_error(send, InvalidRequestError("invalid Content-Length header"))
            return
        if declared is not None and declared > self.max_bytes:
            await send_error(send, PayloadTooLargeError(self.max_bytes, declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(send, PayloadTooLargeError(self.max_bytes, None))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    """None if absent, -1 if malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
