"""Pure synthetic multi-query associative recall (Zoology-style MQAR) for the recall experiment.

Vocabulary (ids): [0, n_filler) filler, then n_keys key tokens, then n_values value tokens; the three
ranges never overlap, so nothing but a pair writes or asks a key. Layout of one sequence of L tokens:

    filler prefix | k_1 v_1 ... k_n v_n | filler with the n queries k_a v_a scattered in it

Every key is asked once, in a random order, each query followed by its value (teacher forcing), at
2-token slots placed uniformly at random after the pairs. The model is scored at each query key:
its next-token prediction must be that key's value. The distance of a query is (query key position
- pair key position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class MQARSeq:
    ids: np.ndarray  # [L] int64
    query_pos: np.ndarray  # [n] positions whose next token is an answer
    answers: np.ndarray  # [n] the value each query must produce
    distance: np.ndarray  # [n] query key position - pair key position


@dataclass(frozen=True, slots=True)
class MQARTask:
    seq_len: int = 1024
    n_filler: int = 64
    n_keys: int = 512
    n_values: int = 512
    max_prefix: int = 64

    def __post_init__(self) -> None:
        if min(self.n_filler, self.n_keys, self.n_values) < 1:
            raise ValueError(f"every id range needs >= 1 token, got {self.n_filler}, {self.n_keys}, {self.n_values}")

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values

    @property
    def max_pairs(self) -> int:
        """The most pairs that fit with the longest prefix: 2n for the pairs, 2n for the queries."""
        return min(self.n_keys, (self.seq_len - self.max_prefix) // 4)

    def make(self, rng: np.random.Generator, n_pairs: int, prefix: int | None = None) -> MQARSeq:
        L = self.seq_len
        if not 1 <= n_pairs <= self.max_pairs:
            raise ValueError(f"n_pairs must be in [1, {self.max_pairs}] for seq_len {L}, got {n_pairs}")
        p = int(rng.integers(0, self.max_prefix + 1)) if prefix is None else prefix
        if not 0 <= p <= self.max_prefix:
            raise ValueError(f"prefix must be in [0, {self.max_prefix}], got {p}")
        ids = rng.integers(0, self.n_filler, size=L)
        keys = rng.choice(self.n_keys, size=n_pairs, replace=False) + self.n_filler
        values = rng.integers(0, self.n_values, size=n_pairs) + self.n_filler + self.n_keys
        ids[p: p + 2 * n_pairs: 2] = keys
        ids[p + 1: p + 2 * n_pairs: 2] = values
        start, rest = p + 2 * n_pairs, L - p - 2 * n_pairs
        # n non-overlapping 2-token slots among `rest` cells: distinct sorted picks from rest - n, shifted by i
        slots = np.sort(rng.choice(rest - n_pairs, size=n_pairs, replace=False)) + np.arange(n_pairs)
        query_pos = start + slots
        asked = rng.permutation(n_pairs)
        ids[query_pos] = keys[asked]
        ids[query_pos + 1] = values[asked]
        return MQARSeq(ids.astype(np.int64), query_pos, values[asked], query_pos - (p + 2 * asked))


@dataclass(frozen=True, slots=True)
class PairCurriculum:
    """Pair counts log-uniform in [min_pairs, cap(step)], the cap growing geometrically from
    start_pairs to max_pairs over the first ramp_steps steps (then fixed)."""

    min_pairs: int
    start_pairs: int
    max_pairs: int
    ramp_steps: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_pairs <= self.start_pairs <= self.max_pairs:
            raise ValueError(f"need 1 <= min_pairs <= start_pairs <= max_pairs, got "
                             f"{self.min_pairs}, {self.start_pairs}, {self.max_pairs}")
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")

    def cap(self, step: int) -> int:
        frac = 1.0 if self.ramp_steps == 0 else min(1.0, step / self.ramp_steps)
        return round(math.exp(math.log(self.start_pairs) + frac * math.log(self.max_pairs / self.start_pairs)))

    def sample(self, rng: np.random.Generator, step: int) -> int:
        hi = self.cap(step)
        n = int(math.exp(rng.uniform(math.log(self.min_pairs), math.log(hi + 1))))
        return max(self.min_pairs, min(n, hi))


def batch(task: MQARTask, rng: np.random.Generator, pair_counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [B, L], targets [B, L]: -100 everywhere but at the query keys, where it is the value
    the next input holds) for one pair count per row."""
    B, L = len(pair_counts), task.seq_len
    ids = np.empty((B, L), dtype=np.int64)
    targets = np.full((B, L), -100, dtype=np.int64)
    for r, n in enumerate(pair_counts):
        seq = task.make(rng, n)
        ids[r] = seq.ids
        targets[r, seq.query_pos] = seq.answers
    return ids, targets


def eval_suite(task: MQARTask, pair_counts: list[int], per_count: int, seed: int) -> list[tuple[int, MQARSeq]]:
    """(n_pairs, sequence) pairs, round by round over the pair counts (a run cut short covers all)."""
    rng = np.random.default_rng(seed)
    return [(n, task.make(rng, n)) for _ in range(per_count) for n in pair_counts]
