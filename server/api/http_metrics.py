"""ASGI middleware that counts every HTTP request by route template and status
(`mcserve:http_requests_total`), including those that inner middleware answers before routing."""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcserve.server.metrics import EngineMetrics

OTHER_ROUTE = "other"  # paths that match no route: one label value, so scanners cannot grow the series
_CONVERTER = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


class HttpMetricsMiddleware:
    """`routes`: (template, compiled path regex) of the app's routes, matched in order; a template's
    converters are dropped from its label (/v1/models/{model_id:path} -> /v1/models/{model_id})."""

    def __init__(self, app: ASGIApp, metrics: EngineMetrics, routes: Iterable[tuple[str, re.Pattern[str]]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = [(_CONVERTER.sub(r"{\1}", path), regex) for path, regex in routes]
        metrics.declare_routes(label for label, _ in self.routes)

    def route_of(self, path: str) -> str:
        return next((label for label, regex in self.routes if regex.match(path)), OTHER_ROUTE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before answering, ErrorGuard (inside) has answered 500 or nothing

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.count_http(self.route_of(scope["path"]), status)
