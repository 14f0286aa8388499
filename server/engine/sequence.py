"""One generation stream (one choice of a request) and its life cycle in the scheduler.

WAITING -> RUNNING -> FINISHED_*; RUNNING -> PREEMPTED (back in the waiting queue, recomputed from
its prefix on re-admission) -> RUNNING; any state -> FINISHED_ABORTED.

Positions: `token_ids` = prompt + output; `num_computed_tokens` of them are absorbed in the state
slot. While decoding, the last token is sampled but not yet computed (num_computed == num_tokens - 1);
the next decode row feeds it at position num_computed.

Async scheduling (llm_engine.py): a decode step launched before the one before it is collected
counts its token as computed at once and appends `PENDING` for the token it samples; the last
`num_pending` entries of `token_ids` are such placeholders until the step is collected. Prefix hashes
never cover them.

Exactness: `inexact_from` is the first position computed while the sequence read around a hole (a
checkpoint of an earlier segment offloaded or dropped); from there on its state differs from a cold
run's, so nothing it computes from that position on is published (see scheduler). A preemption
recomputes from exact cached states and clears it.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from mcserve.server.engine.prefix_index import extend_chain
from mcserve.server.errors import InvalidRequestError

PENDING = -1  # a sampled token still on the device (async scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in FINISH_REASONS


FINISH_REASONS = ("stop", "length", "abort", "error")


class Sequence:
    # slots: the scheduler and the engine read a few of these per row per step
    __slots__ = ("seq_id", "request_id", "params", "priority", "arrival_time", "token_ids", "num_prompt_tokens",
                 "status", "num_computed_tokens", "num_prefill_tokens", "num_cached_tokens", "num_preemptions",
                 "inexact_from", "slot", "num_pending", "reuse_prefix", "_hashes")
    _next_id = itertools.count()

    def __init__(self, prompt_token_ids: Seq[int], *, seq_id: int | None = None, request_id: str = "",
                 priority: int = 0, arrival_time: float = 0.0, cache_root: bytes = b"",
                 params: Any = None) -> None:
        """cache_root: h_0 of its prefix hashes (prefix_index.namespace_root: model, MC settings,
        SSC's k, tenant); sequences share cached states only under the same root."""
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        self.seq_id = next(Sequence._next_id) if seq_id is None else seq_id
        self.request_id = request_id
        self.params = params  # opaque to the scheduler (the engine's SamplingParams)
        self.priority = priority  # lower runs first; FCFS by arrival among equals
        self.arrival_time = arrival_time
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_prefill_tokens = 0  # prefill target set at (re)admission: every token known then
        self.num_cached_tokens = 0  # prompt tokens reused from the cache at the first admission
        self.num_preemptions = 0
        self.inexact_from: int | None = None
        self.slot: int | None = None
        self.num_pending = 0  # trailing PENDING entries of token_ids
        # False: admitted from position 0, no cached prefix or snapshot (prompt logprobs need every
        # position's logits); the engine sets it
        self.reuse_prefix = True
        self._hashes: list[bytes] = [cache_root]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, slot={self.slot})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def drop_pending(self) -> None:
        """Forget the placeholders of tokens that will never be collected (the sequence ended)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority, then arrival (FCFS), then id."""
        return (self.priority, self.arrival_time, self.seq_id)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def prefix_hashes(self, segment_size: int) -> list[bytes]:
        """[h_0 .. h_n] for the n whole segments of token_ids (see prefix_index). Cached: tokens only
        ever get appended, so earlier hashes never change. The list is shared: do not modify it."""
        return extend_chain(self._hashes, self.token_ids, segment_size)
