"""How useful a checkpoint is: the router weight it has received, decayed over time, and the order of
idle-eviction candidates that follows from it.

u = u * decay^(steps since its last update) + router weight. Comparing u_a*d^(now-s_a) with
u_b*d^(now-s_b) does not depend on `now`, so an idle checkpoint's rank (log u - s log d) is fixed
until its utility changes, which lets the idle candidates live in a heap with lazy invalidation.
"""

from __future__ import annotations

import heapq
import itertools
import math

from mcserve.server.engine.cache.checkpoint import Checkpoint


class UtilityPolicy:
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._log_decay = math.log(decay)
        self.now = 0

    def value(self, c: Checkpoint) -> float:
        """Current (decayed) utility."""
        return c.utility * self.decay ** (self.now - c.stamp)

    def rebase(self, c: Checkpoint) -> None:
        """Fold the decay up to now into `c.utility`."""
        c.utility = self.value(c)
        c.stamp = self.now

    def credit(self, c: Checkpoint, weight: float) -> None:
        self.rebase(c)
        c.utility += weight

    def rank(self, c: Checkpoint) -> tuple[float, int, int]:
        """Eviction order, lowest first: utility (decay-invariant form), then least recently
        touched, then deepest."""
        u = math.log(c.utility) - c.stamp * self._log_decay if c.utility > 0 else -math.inf
        return (u, c.stamp, -c.segment)

    def lowest(self, candidates: list[Checkpoint]) -> Checkpoint:
        return min(candidates, key=self.rank)

    def rate(self, c: Checkpoint) -> float:
        """Utility per step of life, with the same decay: u / sum_{a < age} decay^a. A decayed sum
        grows with age until the decay horizon, so comparing sums would always favour the older of
        two checkpoints read equally often; the rate does not. Infinite before its first step."""
        age = self.now - c.born
        if age <= 0:
            return math.inf
        exposure = age if self.decay == 1.0 else (1.0 - self.decay**age) / (1.0 - self.decay)
        return self.value(c) / exposure

    def lowest_rate(self, candidates: list[Checkpoint]) -> Checkpoint:
        return min(candidates, key=lambda c: (self.rate(c), self.rank(c)))


class IdleHeap:
    """Idle-eviction candidates by rank. An entry is current while the checkpoint's `version` is the
    one it was pushed with; `pop` skips the others, and the heap is compacted when stale entries
    pile up (bounded by a multiple of the pool size)."""

    def __init__(self, policy: UtilityPolicy, num_blocks: int) -> None:
        self._policy = policy
        self._limit = 4 * num_blocks + 64
        self._heap: list[tuple[float, int, int, int, int, Checkpoint]] = []
        self._tiebreak = itertools.count()

    def push(self, c: Checkpoint) -> None:
        heapq.heappush(self._heap, (*self._policy.rank(c), next(self._tiebreak), c.version, c))
        if len(self._heap) > self._limit:
            self._heap = [e for e in self._heap if e[-1].version == e[-2]]
            heapq.heapify(self._heap)

    def pop(self) -> Checkpoint | None:
        """The lowest-ranked current entry, or None when the heap is empty."""
        while self._heap:
            *_, version, c = heapq.heappop(self._heap)
            if version == c.version:
                return c
        return None
