"""The thread pool that takes request work too heavy for the event loop: strict JSON parsing, chat
templating, tokenizing and detokenizing request text.

Why threads help although they share the GIL: tokenizers releases it while Rust encodes
(`Tokenizer.encode` uses the batch call for that), and pure-Python work (Jinja, json) gives it up
every switch interval (5 ms), so `/health` and streams keep being served while a long prompt is
prepared. The pool is small: the cheap limits (server/api/limits.py) bound each task, and more
threads than the HTTP side's cores buy nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ParamSpec, TypeVar

from mcserve.server.engine.cpu_threads import cpu_allowance

P = ParamSpec("P")
T = TypeVar("T")


def default_workers() -> int:
    """2 to 4: one long prompt does not hold up the next, and the engine keeps most cores."""
    return min(4, max(2, cpu_allowance() // 2))


class TextWorker:
    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mcserve-text")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a worker thread (with the caller's context variables). If the
        caller is cancelled the task still runs to its end; its result is dropped."""
        ctx = contextvars.copy_context()
        call = partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
