"""Router weight that held GPU blocks got and that is not yet credited to their checkpoints.

A runner that keeps the weights on the device hands them over as one dense array, a weight per
GPU block read since its last hand-over: with SSC that is nearly every block the running sequences
hold, B x checkpoints per row. A held checkpoint's utility is read only when it stops being held (released, offloaded,
dropped) or when held checkpoints are ranked for eviction (`CheckpointCache._evict_held`), so its
share waits here, summed in one numpy array per GPU block and decayed as a whole (a few vector
operations per hand-over), and each checkpoint takes its own share when its utility is next read
(`take`). Only the weight of blocks that are not held (idle ones, released since the last hand-over)
is credited entry by entry.

Invariants: `held[b]` is whether block b's checkpoint has references; `weights[b]` is 0 where it is
not (a block changes owner only after its share was taken).
"""

from __future__ import annotations

import numpy as np


class PendingWeights:
    def __init__(self, num_blocks: int, decay: float) -> None:
        self.decay = decay
        self.held = np.zeros(num_blocks, dtype=np.bool_)
        self.weights = np.zeros(num_blocks, dtype=np.float64)  # as of step `self.step`
        self.step = 0
        self._any = False  # some weight is pending

    def defer(self, weights: np.ndarray, now: int) -> tuple[list[int], list[float]]:
        """Keep the weights ([blocks], as of step `now`) of held blocks; returns the other blocks with
        weight > 0 and their weights, in block order, to be credited at once."""
        self._decay_to(now)
        self.weights += np.where(self.held, weights, 0.0)
        self._any = True
        rest = np.flatnonzero((weights > 0) & ~self.held)
        return rest.tolist(), weights[rest].tolist()

    def take(self, block: int, now: int) -> float:
        """Block's pending weight decayed to step `now` (0.0 if none), then forgotten."""
        w = float(self.weights[block])
        if w == 0.0:
            return 0.0
        self.weights[block] = 0.0
        return w * self.decay ** (now - self.step) if self.decay != 1.0 else w

    def blocks(self) -> list[int]:
        """Blocks with pending weight."""
        return np.flatnonzero(self.weights).tolist() if self._any else []

    def _decay_to(self, now: int) -> None:
        if now > self.step and self._any and self.decay != 1.0:
            self.weights *= self.decay ** (now - self.step)
        self.step = max(now, self.step)

    def check(self, held: np.ndarray) -> None:
        """Invariants (tests): `held` is the true held mask."""
        assert np.array_equal(self.held, held), "held-block mask drifted"
        assert not self.weights[~held].any(), "pending weight on a block that is not held"
