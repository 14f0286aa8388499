"""Running engine requests for one HTTP request, and streaming their deltas as Server-Sent Events.

`EngineRun` drives one or more `GenerateRequest`s (a completions call with several prompts has one
per prompt) concurrently and yields `(request_index, Delta)` in arrival order. Closing it, for any
reason (done, error, client gone), cancels the engine iterators and calls `engine.abort` for every
request that has not finished, so the engine frees them within one step.

`consume` feeds a run's deltas to a function (the non-streaming bodies); `sse_events` turns a run
into `data: <json>` events, where an error mid-stream becomes an event with the OpenAI error body,
and every stream that is not cut by the client ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.types import Receive

from mcserve.server.api.errors import InternalServerError
from mcserve.server.engine.client import EngineClient, GenerateRequest
from mcserve.server.engine.outputs import Delta
from mcserve.server.errors import MCServeError
from mcserve.server.metrics import RequestTracker

logger = logging.getLogger("mcserve.api")

DONE = b"data: [DONE]\n\n"
_END = object()
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was complete."""


def sse_data(payload: BaseModel | dict) -> bytes:
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + text.encode() + b"\n\n"


LOGGED_CHARS = 4096  # of each prompt and completion, with --log-requests


class EngineRun:
    """One HTTP request's engine requests, merged. Use: `await run.start()`, `async for k, delta in
    run`, and always `await run.close(reason)` (idempotent).

    `log_requests`: log the completion texts at close (the caller logs the prompt); off, no text of
    the request or the response reaches the log."""

    def __init__(
        self,
        engine: EngineClient,
        requests: Sequence[GenerateRequest],
        trackers: Sequence[RequestTracker],
        *,
        log_requests: bool = False,
    ) -> None:
        assert len(requests) == len(trackers) > 0
        self.engine = engine
        self._texts: dict[tuple[int, int], list[str]] | None = {} if log_requests else None
        self.requests = list(requests)
        self._trackers = list(trackers)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._buffer: deque[tuple[int, Any]] = deque()
        self._tasks: list[asyncio.Task] = []
        self._finished: list[set[int]] = [set() for _ in requests]
        self._ended = 0
        self._closed = False

    async def _pump(self, k: int) -> None:
        tracker, finished = self._trackers[k], self._finished[k]
        try:
            async for delta in self.engine.generate(self.requests[k]):
                tracker.on_delta(delta)
                if self._texts is not None and delta.text:
                    self._texts.setdefault((k, delta.index), []).append(delta.text)
                if delta.finish_reason is not None:
                    finished.add(delta.index)
                self._queue.put_nowait((k, delta))
            self._queue.put_nowait((k, _END))
        except Exception as e:  # handed to the consumer, which reports it
            self._queue.put_nowait((k, e))

    async def start(self) -> None:
        """Submit every request and wait until the engine has accepted each (its first delta: the
        engine sends an empty one on queueing), so that errors it raises up front (invalid request,
        queue full) become an HTTP status, not a stream event, and a stream starts while queued."""
        self._tasks = [asyncio.ensure_future(self._pump(k)) for k in range(len(self.requests))]
        pending = set(range(len(self.requests)))
        while pending:
            k, item = await self._queue.get()
            if isinstance(item, BaseException):
                await self.close("error", record=False)  # rejected up front: not a served request
                raise item
            pending.discard(k)
            self._buffer.append((k, item))

    @property
    def closed(self) -> bool:
        return self._closed

    def interrupt(self, error: BaseException) -> None:
        """End the run with `error`: the consumer gets it after what has already arrived (a drain
        that timed out; see drain.py)."""
        if not self._closed:
            self._queue.put_nowait((0, error))

    def __aiter__(self) -> EngineRun:
        return self

    async def __anext__(self) -> tuple[int, Delta]:
        while self._ended < len(self.requests):
            k, item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is _END:
                self._ended += 1
                continue
            if isinstance(item, BaseException):
                raise item
            return k, item
        raise StopAsyncIteration

    def _n(self, k: int) -> int:
        return self.requests[k].params.n

    async def close(self, reason: str = "abort", *, record: bool = True) -> None:
        """Stop everything; unfinished choices are recorded with finish reason `reason` (nothing is
        recorded when `record` is false)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):  # runs to the end even when the caller is being cancelled
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for k, req in enumerate(self.requests):
                if len(self._finished[k]) < self._n(k):
                    try:
                        await self.engine.abort(req.request_id)
                    except Exception:  # keep freeing the others; the error that brought us here wins
                        logger.exception("abort of %s failed", req.request_id)
                if record:
                    self._trackers[k].finish(self._n(k), default_reason=reason)
            if self._texts is not None:
                for (k, i), parts in sorted(self._texts.items()):
                    logger.info(
                        "completion %s choice %d (%s): %r",
                        self.requests[k].request_id,
                        i,
                        reason,
                        "".join(parts)[:LOGGED_CHARS],
                    )


class ChunkWriter(Protocol):
    """Builds the stream chunks of one endpoint (chat or completions)."""

    def opening(self) -> list[BaseModel]: ...

    def on_delta(self, k: int, delta: Delta) -> list[BaseModel]: ...

    def closing(self) -> list[BaseModel]: ...


def engine_error(delta: Delta) -> MCServeError:
    return InternalServerError(f"generation failed: {delta.error or 'unknown engine error'}", code="engine_error")


async def consume(run: EngineRun, on_delta: Callable[[int, Delta], None]) -> None:
    """Hand every delta of a started run to `on_delta(request_index, delta)` until each choice has
    finished, then close the run (a non-streaming response is built this way). A delta with finish
    reason "error" raises `engine_error`; choices left unfinished count as "error" when anything
    raised, as "abort" when the caller is cancelled (the client went away)."""
    reason = "abort"
    try:
        async for k, delta in run:
            if delta.finish_reason == "error":
                raise engine_error(delta)
            on_delta(k, delta)
    except Exception:
        reason = "error"
        raise
    finally:
        await run.close(reason)


async def sse_events(run: EngineRun, writer: ChunkWriter) -> AsyncIterator[bytes]:
    reason = "abort"  # what unfinished choices count as if we stop early (client gone)
    try:
        for chunk in writer.opening():
            yield sse_data(chunk)
        async for k, delta in run:
            if delta.finish_reason == "error":
                raise engine_error(delta)
            for chunk in writer.on_delta(k, delta):
                yield sse_data(chunk)
        for chunk in writer.closing():
            yield sse_data(chunk)
        reason = "stop"
    except MCServeError as e:
        reason = "error"
        logger.warning("stream %s failed: %s", run.requests[0].request_id, e.message)
        yield sse_data(e.to_dict())
    except Exception as e:
        reason = "error"
        logger.exception("stream %s failed", run.requests[0].request_id)
        yield sse_data(InternalServerError(f"internal error: {type(e).__name__}").to_dict())
    finally:
        await run.close(reason)
    yield DONE


def sse_response(run: EngineRun, writer: ChunkWriter, ping_s: float) -> EventSourceResponse:
    async def on_client_close(_: dict) -> None:
        # Covers a disconnect before the event generator ever ran (its finally would not run then).
        await run.close("abort")

    # ping_s == 0 turns pings off; passed as a day-long interval because sse-starlette < 3 busy-loops on 0.
    return EventSourceResponse(
        sse_events(run, writer),
        ping=ping_s or 86400,
        sep="\n",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        client_close_handler_callable=on_client_close,
    )


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then `ClientDisconnected`).
    Call only after the request body has been read: this consumes `receive`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()
