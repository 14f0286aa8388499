"""`SessionService`: what the HTTP side may do with named sessions, and their persistence.

It runs on the caller's threads and reaches the engine's `SessionBook` only through
`AsyncEngine.call` (the engine thread runs the function between steps); file I/O (`SessionStore`)
runs in worker threads, never on the event loop and never on the engine thread. So a save copies
the states off the device between two steps, and the step loop goes on while the file is written.

- save: on request, every `save_interval_s` for the sessions that finished a turn since their last
  save (a daemon thread), and at shutdown (`close`);
- restore: lazily, before the first request that names a session this process does not know: the
  file is read and checked in a worker thread; a file that does not check out fails that request
  with SessionFileError (409, naming the problem) and is never loaded; other requests are unaffected;
- delete: the file, the book's record and every state cached under the session's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.sessions.book import SessionBook, SessionKey, owner_of
from mcserve.server.engine.sessions.image import SessionImage
from mcserve.server.engine.sessions.store import SessionStore
from mcserve.server.errors import InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

DEFAULT_SAVE_INTERVAL_S = 60.0
CALL_TIMEOUT_S = 60.0


class SessionService:
    def __init__(self, call: Callable[[Callable[[], Any]], Future], book: SessionBook,
                 session_dir: str | Path | None = None, save_interval_s: float = DEFAULT_SAVE_INTERVAL_S) -> None:
        """`call(fn)`: run fn on the engine thread, its result in the returned future."""
        self._call = call
        self._book = book
        self.store = None if session_dir is None else SessionStore(session_dir, book.identity, book.shapes)
        self.save_interval_s = save_interval_s
        self._known: set[SessionKey] = set()  # restored, or found to have no file, in this process
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saver: threading.Thread | None = None

    def start(self) -> None:
        if self.store is not None and self.save_interval_s > 0:
            self._saver = threading.Thread(target=self._save_periodically, name="mcserve-session-saver", daemon=True)
            self._saver.start()

    def close(self) -> None:
        """Stop the periodic saver and save what changed (the engine thread must still run)."""
        self._stop.set()
        if self._saver is not None:
            self._saver.join(CALL_TIMEOUT_S)
        self.save_dirty()

    async def restore_for(self, request: GenerateRequest) -> None:
        """Before `request` is queued: install its session's saved states if this process has not
        seen the session yet. SessionFileError if its file cannot be restored."""
        if self.store is None or request.session_id is None:
            return
        key = (owner_of(request.api_key), request.session_id)
        with self._lock:
            if key in self._known:
                return
        image = await asyncio.to_thread(self.store.read, *key)
        if image is not None:
            book = self._book
            # queued before the request itself, so its admission sees the states
            self._call(lambda: key in book or book.install(image))
            log.info("session %r: restoring %d tokens (%d checkpoints%s)", request.session_id, len(image.tokens),
                     image.num_checkpoints, ", snapshot" if image.snapshot is not None else "")
        with self._lock:
            self._known.add(key)

    async def save(self, api_key: str | None, session_id: str) -> dict[str, object]:
        if self.store is None:
            raise InvalidRequestError("this server does not persist sessions: start it with --session-dir",
                                      param="session_id", code="sessions_not_persisted")
        key = (owner_of(api_key), session_id)
        book = self._book
        image, known = await asyncio.wrap_future(self._call(lambda: (book.export(key), key in book)))
        if image is None:
            why = "nothing of it is cached any more" if known else "no such session"
            raise NotFoundError(f"session {session_id!r} cannot be saved: {why}", param="session_id",
                                code="session_not_found")
        size = await asyncio.to_thread(self.store.write, image)
        return {**image.info(), "bytes": size}

    async def delete(self, api_key: str | None, session_id: str) -> None:
        key = (owner_of(api_key), session_id)
        book = self._book
        in_memory = await asyncio.wrap_future(self._call(lambda: book.forget(key)))
        on_disk = self.store is not None and await asyncio.to_thread(self.store.delete, *key)
        with self._lock:
            self._known.add(key)  # gone: a later request starts it afresh
        if not (in_memory or on_disk):
            raise NotFoundError(f"no session {session_id!r}", param="session_id", code="session_not_found")

    async def list(self, api_key: str | None) -> list[dict[str, object]]:
        owner, book = owner_of(api_key), self._book
        live = await asyncio.wrap_future(self._call(lambda: book.session_ids(owner)))
        saved = {} if self.store is None else {s["id"]: s for s in await asyncio.to_thread(self.store.list, owner)}
        out = []
        for sid in dict.fromkeys([*live, *saved]):
            s = saved.get(sid, {})
            out.append({"id": sid, "in_memory": sid in live, "saved_at": s.get("saved_at"), "tokens": s.get("tokens")})
        return out

    def save_dirty(self) -> int:
        """Save every session that finished a turn since its last save (any thread but the engine's
        and the event loop's). Returns how many files were written; failures are logged."""
        if self.store is None:
            return 0
        book = self._book
        try:
            images: list[SessionImage] = self._call(
                lambda: [i for k in book.dirty() if (i := book.export(k)) is not None]).result(CALL_TIMEOUT_S)
        except Exception as e:  # the engine is gone or busy past the timeout: nothing to save from
            log.warning("sessions not saved: %r", e)
            return 0
        written = 0
        for image in images:
            try:
                self.store.write(image)
                written += 1
            except OSError as e:
                log.error("saving session %r failed: %s", image.session_id, e)
        return written

    def _save_periodically(self) -> None:
        while not self._stop.wait(self.save_interval_s):
            self.save_dirty()
