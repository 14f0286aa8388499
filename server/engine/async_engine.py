"""`AsyncEngine`: the EngineClient the HTTP layer talks to. The LLMEngine runs in one background thread;
requests come in through a thread-safe inbox, deltas go out through one asyncio queue per request.

Thread ownership: only the engine thread touches the LLMEngine (except `validate`, which reads
immutable configuration). `_streams` (request id -> its queue) is shared under `_lock`.

Engine loop: drain the inbox (adds, aborts, stop), run one step if anything is unfinished, hand each
event loop its deltas with one `call_soon_threadsafe`; block on the inbox when idle. So an abort (an
explicit one, or a cancelled iterator when the client goes away) takes effect before the next step.
A request the engine refuses (queue full, ...) gets the exception through its queue, before any delta;
one it accepts gets an empty delta (no tokens, no text) at once, so a stream can start before the
first token exists.

Watchdog: the loop stamps the start of every step; a step longer than `slow_step_s` is counted
(`health()`, metrics `on_slow_step`) when it ends, and `health().step_running_s` shows one that has
not ended yet, read from any thread.

Named sessions (`sessions`, a SessionService): their saves, restores and deletions reach the engine
through `call(fn)`, which runs fn on the engine thread between steps; file I/O stays off it.

A failure inside a step fails only the requests it concerns (LLMEngine.step), and the loop goes on;
so does a request whose `add_request` raises something unexpected (it alone gets the exception). If
an exception escapes the loop (EngineDeadError: the device is unusable), the engine is dead
(`health().state`): every in-flight choice gets a final Delta with finish_reason "error", requests
not yet added get EngineDeadError, and so does every later `generate`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mcserve.server.engine.client import EngineHealth, EngineStats, GenerateRequest
from mcserve.server.engine.cpu_threads import use_threads
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.outputs import Delta
from mcserve.server.engine.sessions.service import DEFAULT_SAVE_INTERVAL_S, SessionService
from mcserve.server.errors import EngineDeadError, InvalidRequestError, MCServeError

log = logging.getLogger(__name__)


class _Stream:
    """One request's way back to its consumer: items are lists of Deltas or an exception."""

    __slots__ = ("loop", "queue", "n")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[Delta] | BaseException] = asyncio.Queue()
        self.n = n


DEFAULT_SLOW_STEP_S = 10.0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, start: bool = True, slow_step_s: float = DEFAULT_SLOW_STEP_S,
                 session_dir: str | Path | None = None,
                 session_save_interval_s: float = DEFAULT_SAVE_INTERVAL_S) -> None:
        """`session_dir`: where named sessions are saved (None: they live in memory only)."""
        self.engine = engine
        self.slow_step_s = slow_step_s
        self._step_started = 0.0  # time.monotonic() when the current step began; 0 between steps
        self._slow_steps = 0
        self._last_slow_step_s: float | None = None
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.max_waiting = engine.config.max_waiting
        self.max_num_seqs = engine.config.max_num_seqs
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._open: dict[str, set[int]] = {}  # engine thread only: added requests -> unfinished choices
        self._dead: BaseException | None = None
        self._stopped = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="mcserve-engine", daemon=True)
        self.sessions = SessionService(self.call, engine.sessions, session_dir, session_save_interval_s)
        if start:
            self.start()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, metrics: Any = None, slow_step_s: float = DEFAULT_SLOW_STEP_S,
                       session_dir: str | Path | None = None,
                       session_save_interval_s: float = DEFAULT_SAVE_INTERVAL_S, **kwargs: Any) -> AsyncEngine:
        """Load the model, size the pools (ConfigError if max_num_seqs cannot fit) and start the loop.
        `kwargs`: EngineArgs (server/engine/args.py)."""
        return cls(LLMEngine.from_model_dir(model_dir, metrics=metrics, **kwargs), slow_step_s=slow_step_s,
                   session_dir=session_dir, session_save_interval_s=session_save_interval_s)

    def start(self) -> None:
        self._thread.start()
        self.sessions.start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread between steps; its result (or exception) in the future.
        EngineDeadError in the future once the loop has stopped."""
        future: Future = Future()
        with self._lock:
            if self._dead is not None or self._stopped:
                future.set_exception(self._dead_error())
                return future
            self._inbox.put(("call", (fn, future)))
        return future

    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive() and self._dead is None and not self._stopped

    @property
    def counters(self) -> Counter[str]:
        return self.engine.counters

    def stats(self) -> EngineStats:
        return self._stats

    def health(self) -> EngineHealth:
        started = self._step_started
        running = time.monotonic() - started if started else 0.0
        if self._dead is not None:
            state, error = "dead", f"the engine loop died: {self._dead!r}"
        elif self._thread.ident is None:
            state, error = "loading", None  # not started yet
        elif self._stopped or not self._thread.is_alive():
            state, error = "dead", "the engine is shut down"
        else:
            state, error = "ready", None
        return EngineHealth(state, error, self.slow_step_s, self._slow_steps, self._last_slow_step_s, running)

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def save_session(self, api_key: str | None, session_id: str) -> dict:
        return await self.sessions.save(api_key, session_id)

    async def delete_session(self, api_key: str | None, session_id: str) -> None:
        await self.sessions.delete(api_key, session_id)

    async def list_sessions(self, api_key: str | None) -> list[dict]:
        return await self.sessions.list(api_key)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Save the sessions that changed, abort everything in flight and stop the loop (idempotent)."""
        if self._thread.is_alive():
            self.sessions.close()
            self._inbox.put(("stop", None))
            self._thread.join(timeout_s)
        self._stopped = True
        self.engine.close()

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        self.engine.validate(request)
        await self.sessions.restore_for(request)
        rid = request.request_id
        stream = _Stream(asyncio.get_running_loop(), request.params.n)
        with self._lock:
            if self._dead is not None or self._stopped:
                raise self._dead_error()
            if rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in flight", param="request_id")
            self._streams[rid] = stream
        self._inbox.put(("add", request))
        finished: set[int] = set()
        try:
            while len(finished) < stream.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = set(range(stream.n))
                    raise item
                finished.update(d.index for d in item if d.finish_reason is not None)
                for delta in item:
                    yield delta
        finally:
            with self._lock:
                if self._streams.get(rid) is stream:
                    del self._streams[rid]
            if len(finished) < stream.n:  # cancelled or closed early: free everything
                self._inbox.put(("abort", rid))

    def _dead_error(self) -> EngineDeadError:
        if self._dead is not None:
            return EngineDeadError(f"the engine loop died: {self._dead!r}; restart the server")
        return EngineDeadError("the engine is shut down")

    def _run(self) -> None:
        if self.engine.num_threads is not None:
            use_threads(self.engine.num_threads)  # per thread in torch: this one runs the model
        try:
            while True:
                if not self.engine.has_unfinished() and not self._handle(self._inbox.get()):
                    break
                if not self._drain():
                    break
                if self.engine.has_unfinished():
                    self._step_started = start = time.monotonic()
                    deltas = self.engine.step()
                    self._step_started = 0.0
                    self._on_step_time(time.monotonic() - start)
                    self._stats = self.engine.stats()
                    self._dispatch(deltas)
            self._close()
        except BaseException as e:  # noqa: B036 -- the loop must report any failure to its clients
            log.exception("engine loop died")
            self._die(e)

    def _on_step_time(self, seconds: float) -> None:
        if seconds <= self.slow_step_s:
            return
        self._slow_steps += 1
        self._last_slow_step_s = seconds
        log.warning("slow engine step: %.2f s (budget %.2f s): %s", seconds, self.slow_step_s, self.engine.stats())
        if self.engine.metrics is not None:
            self.engine.metrics.on_slow_step(seconds)

    def _drain(self) -> bool:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if not self._handle(item):
                return False

    def _handle(self, item: tuple[str, Any]) -> bool:
        """Apply one inbox message; False on stop."""
        kind, payload = item
        if kind == "add":
            rid = payload.request_id
            try:
                self.engine.add_request(payload)
            except MCServeError as e:
                self._send(rid, e)
            except Exception as e:  # an engine bug this request triggered: it alone fails
                log.exception("adding request %s failed", rid)
                self._send(rid, e)
            else:
                self._open[rid] = set(range(payload.params.n))
                self._dispatch([Delta(rid, 0, (), "")])  # accepted: the HTTP layer may answer now
        elif kind == "abort":
            self._dispatch(self.engine.abort(payload))
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn())
            except Exception as e:  # the caller's to handle
                future.set_exception(e)
        else:
            assert kind == "stop", kind
            return False
        self._stats = self.engine.stats()
        return True

    def _send(self, rid: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(rid, None)
        if stream is not None:
            _post(stream.loop, [(stream.queue, error)])

    def _dispatch(self, deltas: list[Delta]) -> None:
        """Group deltas per request and per event loop; one thread-safe call per loop."""
        if not deltas:
            return
        by_request: dict[str, list[Delta]] = {}
        for d in deltas:  # per row of every step: no list made for nothing (setdefault's default)
            batch = by_request.get(d.request_id)
            if batch is None:
                by_request[d.request_id] = [d]
            else:
                batch.append(d)
            if d.finish_reason is not None:
                left = self._open.get(d.request_id)
                if left is not None:
                    left.discard(d.index)
                    if not left:
                        del self._open[d.request_id]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for rid, batch in by_request.items():
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, batch))
                    if rid not in self._open:
                        del self._streams[rid]
        for loop, items in by_loop.items():
            _post(loop, items)

    def _close(self) -> None:
        """Stop: abort what is in flight, refuse what was not added yet."""
        for rid in list(self._open):
            self._dispatch(self.engine.abort(rid))
        with self._lock:
            self._stopped = True
        self._refuse_pending()

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
        deltas = [Delta(rid, i, (), "", finish_reason="error", error=f"engine failure: {error!r}")
                  for rid, left in self._open.items() for i in sorted(left)]
        self._dispatch(deltas)
        self._refuse_pending()

    def _refuse_pending(self) -> None:
        """Every stream still registered was never added (or its request is gone), and every call
        still queued: EngineDeadError."""
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        err = self._dead_error()
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                payload[1].set_exception(err)
        for _, stream in streams:
            _post(stream.loop, [(stream.queue, err)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    def deliver() -> None:
        for q, item in items:
            q.put_nowait(item)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
        pass
