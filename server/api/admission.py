"""Admission: refusing an overloaded server's new requests before any work is spent on them.

The engine's bound on its waiting queue (`LLMEngine.add_request`, `max_waiting` sequences) is exact,
but it is reached only after the body has been parsed, the chat template rendered and the prompt
tokenized in the text worker (text_worker.py), where requests take turns. Under overload every
refused request would first wait for its turn there (seconds with hundreds in line). So each
generation request takes a `Ticket` first: the sequences admitted but not yet queued in the engine
(`pending`), plus those waiting in it, must leave room for the request's own in the waiting queue
and the free running places (`max_num_seqs` less those running: the scheduler moves waiting sequences
there at its next step), else 503 with Retry-After at once. The engine's check stays, exact; this one
only answers sooner. When admitted requests reach the engine faster than it steps, the engine may
still refuse some of them (after their templating, as before).

A ticket counts 1 sequence until the body is parsed, then `resize` sets the request's real count (n
per prompt, times the prompts), checked again before templating. It is given back once the engine
has queued the request (then the engine counts it as waiting; `EngineRun.start` returns only after
that) or when the request ends in any other way, including a client that left while its text was
being prepared: the worker still does that work, and the tickets bound it.

Event-loop only (no lock). The engine's waiting count is its last published `stats()`; when it lags,
a request may briefly count twice (conservative: refused a little early) or once too few (the
engine's exact check then refuses it).
"""

from __future__ import annotations

from types import TracebackType

from mcserve.server.engine.client import EngineClient
from mcserve.server.errors import InvalidRequestError, QueueFullError


class Admission:
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine
        self.pending = 0  # sequences of the tickets not yet given back

    def admit(self) -> Ticket:
        """A ticket for 1 sequence, or QueueFullError when there is no room even for that."""
        ticket = Ticket(self)
        self._check(ticket, 1)
        self.pending += 1
        ticket.sequences = 1
        return ticket

    def _check(self, ticket: Ticket, sequences: int) -> None:
        limit = self._engine.max_waiting
        if sequences > limit:  # would wait forever for room: the client's error, not a retry
            raise InvalidRequestError(
                f"{sequences} sequences (choices per prompt x prompts) can never fit this server's waiting queue "
                f"of {limit} sequences; lower n or send fewer prompts",
                param="n",
            )
        others = self.pending - ticket.sequences
        stats = self._engine.stats()
        waiting, free = stats.num_waiting, max(0, self._engine.max_num_seqs - stats.num_running)
        if waiting + others + sequences > limit + free:
            raise QueueFullError(
                f"the waiting queue holds {waiting} of {limit} sequences, {free} running places are free and "
                f"{others} more sequences are being prepared; no room for {sequences} more; retry later"
            )

    def _resize(self, ticket: Ticket, sequences: int) -> None:
        self._check(ticket, sequences)
        self.pending += sequences - ticket.sequences
        ticket.sequences = sequences

    def _release(self, ticket: Ticket) -> None:
        self.pending -= ticket.sequences
        ticket.sequences = 0
        assert self.pending >= 0, self.pending


class Ticket:
    """One request's place in `Admission.pending`; `with admission.admit() as ticket:` gives it back
    on every way out (`release` is idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.sequences = 0
        self.released = False

    def resize(self, sequences: int) -> None:
        """The request's real count, once known: QueueFullError (no room now) or InvalidRequestError
        (more than the queue holds); the ticket keeps its old count if either is raised."""
        assert not self.released
        self._admission._resize(self, max(1, sequences))  # n < 1 is refused later, with the sampling checks

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
