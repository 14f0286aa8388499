"""The contract between the HTTP layer and the engine.

The HTTP layer sees only this protocol, so it can be tested against a fake engine and the engine
can be tested without HTTP. `AsyncEngine` (server/engine/async_engine.py) implements it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from mcserve.server.engine.outputs import Delta
from mcserve.server.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM's convention); FCFS among equals
    session_id: str | None = None  # explicit session: its cache is reachable only with the same key
    api_key: str | None = None  # the tenant: cached prefixes are shared only among requests with the same key
    cache_salt: str | None = None  # and the same salt (vLLM's field): a finer tenant inside one key
    arrival_time: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counts between steps. A state slot is held by a running sequence, parked (an end-of-turn
    snapshot, given up on demand) or free; a checkpoint block on the device is held by running
    sequences, cached (indexed, no holder, evictable) or free. Only the held ones are pressure."""

    num_running: int
    num_waiting: int
    state_slots_running: int
    state_slots_parked: int
    state_slots_total: int
    checkpoint_blocks_running: int
    checkpoint_blocks_cached: int
    checkpoint_blocks_total: int


EngineState = Literal["loading", "ready", "dead"]


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """What /health reports of the engine. `slow_steps` counts finished steps longer than
    `slow_step_s` (the last one's duration in `last_slow_step_s`); `step_running_s` is how long the
    step in progress has run (0 between steps), so a step that never ends shows too."""

    state: EngineState
    error: str | None = None
    slow_step_s: float | None = None
    slow_steps: int = 0
    last_slow_step_s: float | None = None
    step_running_s: float = 0.0

    @property
    def stalled(self) -> bool:
        return self.slow_step_s is not None and self.step_running_s > self.slow_step_s


class EngineClient(Protocol):
    """What a front end may do with an engine.

    `generate` validates the request against the model (context length, token ids) and raises
    `InvalidRequestError`/`ContextLengthError` before yielding anything, `QueueFullError` when
    the waiting queue is full. Once the engine has queued the request it may yield an empty `Delta`
    (choice 0, no tokens, no text: "accepted"); then `Delta`s until every choice has a finish_reason.
    Cancelling the iterator (client disconnect) aborts the request and frees its resources
    within one engine step.
    """

    model_name: str
    max_model_len: int
    max_waiting: int  # the waiting queue's bound, in sequences (a request of n choices takes n)
    max_num_seqs: int  # sequences that run at once

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def health(self) -> EngineHealth: ...

    # Named sessions of the caller's key (server/engine/sessions/service.py says what each does).
    async def save_session(self, api_key: str | None, session_id: str) -> dict: ...

    async def delete_session(self, api_key: str | None, session_id: str) -> None: ...

    async def list_sessions(self, api_key: str | None) -> list[dict]: ...

    @property
    def is_ready(self) -> bool: ...
