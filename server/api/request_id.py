"""`X-Request-Id`: every HTTP response carries one; the client's when it sent a usable one, else a
fresh one. Generation endpoints use it in their response id (`chatcmpl-<id>`, `cmpl-<id>`), as the
engine request id and so in every log line about the request.

A usable id is 1..128 printable ASCII characters without spaces; anything else is replaced (not
refused), as a proxy may add junk. The id must be unique among the client's requests in flight (a
second request with the same id while the first runs is a 400 from the engine).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "mcserve.request_id"
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")


def request_id(scope: Scope) -> str:
    """The id of this HTTP request (set by `RequestIdMiddleware`; a fresh one outside it)."""
    rid = scope.get(SCOPE_KEY)
    return rid if rid is not None else uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER), None)
        rid = given.decode("ascii") if given is not None and _USABLE.fullmatch(given) else uuid.uuid4().hex
        scope[SCOPE_KEY] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("ascii"))]}
            await send(message)

        await self.app(scope, receive, send_with_id)
