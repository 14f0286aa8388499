"""SIGTERM -> drain -> exit 0: the uvicorn server that `mcserve serve` runs.

uvicorn on its own stops listening at the first SIGTERM (so /health cannot say "draining"), gives
connections a fixed graceful timeout, and re-raises the signal after shutting down (exit 143).
`DrainingServer` instead keeps listening and runs `drain()`: `/health` is 503 and new requests get
503 at once (server/api/drain.py), in-flight requests get `drain_timeout` seconds to finish, those
still running are then cut (an error event and `data: [DONE]` on a stream), and only then does uvicorn
shut down, with nothing left for its own timeout to cut. The process then exits 0. A second signal
during the drain exits at once (uvicorn's forced exit), as a second Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from mcserve.server.api.drain import Drain

logger = logging.getLogger("mcserve.shutdown")

# After the drain timeout cut the streams: time for their error events and [DONE] to be written.
CUT_GRACE_S = 5.0

# sse-starlette stops every stream as soon as uvicorn's should_exit is set; here the drain decides when
# streams end. (Its process-wide AppStatus.should_exit is never set here: nothing would reset it.)
AppStatus.disable_automatic_graceful_drain()


def _say(message: str) -> None:
    print(f"mcserve: {message}", file=sys.stderr, flush=True)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread, between two bytecodes of the event loop)."""
        if self.drain.draining or not self.started or self._loop is None:
            # A second signal, or one before the server listens: stop now. Not recorded in
            # _captured_signals, so uvicorn does not re-raise it: the exit status stays ours.
            self.force_exit = self.drain.draining
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, why: str) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain_and_exit(why))

    async def drain_and_exit(self, why: str = "asked to") -> None:
        """Drain, then make uvicorn shut down. Also callable without a signal (tests, embedders)."""
        if not self.drain.begin():
            return
        _say(
            f"{why}: draining ({self.drain.in_flight} request(s) in flight, up to {self.drain_timeout_s:g} s); "
            f"/health answers 503, new requests get 503"
        )
        if not await self.drain.wait_idle(self.drain_timeout_s):
            cut = self.drain.expire()
            _say(f"drain timeout ({self.drain_timeout_s:g} s) passed: ending {cut} request(s) with an error")
            if not await self.drain.wait_idle(CUT_GRACE_S):
                logger.warning("%d request(s) still open after the cut; uvicorn closes them", self.drain.in_flight)
        else:
            _say("drained: no request in flight")
        self.should_exit = True
