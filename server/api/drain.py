"""Draining: what the server does between SIGTERM and exit.

    serving --begin()--> draining --(in-flight requests done, or expire() at the drain timeout)--> exit

While draining, `/health` answers 503 `{"status": "draining"}` (readiness probes and load balancers
take the replica out), `/metrics` and `/version` still answer, and every other request gets 503 with
`Retry-After` and `Connection: close` (the client's retry reconnects, through the balancer, to
another replica). Requests already in flight run to the end; `expire()` cuts those still running
with `ServerDrainingError` (errors.py), which a stream reports as an error event followed by `data: [DONE]`.
`server/cli.py` drives the transitions; `DrainMiddleware` counts what is in flight and turns new
requests away.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from mcserve.server.api.errors import ServerDrainingError, send_error

if TYPE_CHECKING:
    from mcserve.server.api.streaming import EngineRun

# Answered while draining: health for the probes, metrics so the drain can be watched.
DRAIN_OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class Drain:
    """One server's drain state, the HTTP requests in flight and the engine runs to cut at expiry.
    Used from the event loop only."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self.started_at: float | None = None  # time.monotonic() of begin()
        self.in_flight = 0
        self._changed = asyncio.Event()
        self._runs: weakref.WeakSet[EngineRun] = weakref.WeakSet()

    def begin(self) -> bool:
        """Start draining; False if it had already started."""
        if self.draining:
            return False
        self.draining, self.started_at = True, time.monotonic()
        return True

    def track(self, run: EngineRun) -> EngineRun:
        """Remember `run` so that `expire()` can cut it (a run cut before it starts fails at start)."""
        if self.expired:
            run.interrupt(ServerDrainingError())
        self._runs.add(run)
        return run

    def expire(self) -> int:
        """The drain timeout passed: every run still open ends with `ServerDrainingError`. Returns
        how many were cut."""
        self.expired = True
        runs = [r for r in self._runs if not r.closed]
        for run in runs:
            run.interrupt(ServerDrainingError("the server's drain timeout passed during this request"))
        return len(runs)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        assert self.in_flight > 0
        self.in_flight -= 1
        self._changed.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return self.in_flight == 0
        return True


class DrainMiddleware:
    """Counts HTTP requests in flight (a stream until its last byte) and, while draining, answers
    every path but DRAIN_OPEN_PATHS with 503 + Retry-After + Connection: close."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in DRAIN_OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send_error(send, ServerDrainingError(), extra_headers={"connection": "close"})
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
