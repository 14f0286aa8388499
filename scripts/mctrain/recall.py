"""Multi-query associative recall (MQAR) sequences embedded in real text.

Layout of one sequence (token positions):

    text prefix | <|kv|> k_1 v_1 ... k_n v_n | filler text (gap) | <|query|> k_a v_a k_b v_b ... | text

Keys are distinct tokens of one half of the merged BPE vocabulary, values random tokens of the other
half; the queries ask a random order of the keys, each followed by its value (teacher forcing). The
model is scored at each query key: its next-token prediction should be that key's value. The distance
of a query is (query key position - pair key position).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RecallSeq:
    ids: np.ndarray  # [L] int64
    query_pos: np.ndarray  # [Q] positions whose next token is an answer
    answers: np.ndarray  # [Q] the value each query must produce
    distance: np.ndarray  # [Q] query key position - pair key position


@dataclass(frozen=True, slots=True)
class RecallTask:
    vocab_size: int
    kv_id: int  # <|kv|>
    query_id: int  # <|query|>
    first_id: int = 261  # ids below are special tokens and the 256 byte tokens

    def __post_init__(self) -> None:
        if self.vocab_size - self.first_id < 64:
            raise ValueError(f"vocab_size {self.vocab_size} leaves too few merged tokens above id {self.first_id}")

    @property
    def key_range(self) -> tuple[int, int]:
        return self.first_id, (self.first_id + self.vocab_size) // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return (self.first_id + self.vocab_size) // 2, self.vocab_size

    @staticmethod
    def length_needed(n_pairs: int, n_queries: int) -> int:
        return 2 + 2 * n_pairs + 2 * n_queries

    def make(self, rng: np.random.Generator, text: np.ndarray, n_pairs: int, gap: int, prefix: int,
             n_queries: int | None = None) -> RecallSeq:
        """A sequence as long as `text` (real tokens for prefix, filler and tail)."""
        nq = n_pairs if n_queries is None else n_queries
        L = len(text)
        if prefix + gap + self.length_needed(n_pairs, nq) > L:
            raise ValueError(f"{n_pairs} pairs, {nq} queries, gap {gap}, prefix {prefix} do not fit in {L} tokens")
        if not 1 <= nq <= n_pairs:
            raise ValueError(f"n_queries must be in [1, {n_pairs}], got {nq}")
        lo, hi = self.key_range
        keys = rng.choice(hi - lo, size=n_pairs, replace=False) + lo
        values = rng.integers(*self.value_range, size=n_pairs)
        asked = rng.permutation(n_pairs)[:nq]
        ids = np.asarray(text, dtype=np.int64).copy()
        p = prefix
        ids[p] = self.kv_id
        ids[p + 1: p + 1 + 2 * n_pairs: 2] = keys
        ids[p + 2: p + 2 + 2 * n_pairs: 2] = values
        q0 = p + 1 + 2 * n_pairs + gap
        ids[q0] = self.query_id
        query_pos = q0 + 1 + 2 * np.arange(nq)
        ids[query_pos] = keys[asked]
        ids[query_pos + 1] = values[asked]
        return RecallSeq(ids, query_pos, values[asked], query_pos - (p + 1 + 2 * asked))

    def sample_train(self, rng: np.random.Generator, text: np.ndarray, max_pairs: int) -> RecallSeq:
        """A training sequence: log-uniform pairs in [2, max_pairs], all of them asked, random gap
        and prefix so that pairs and queries land anywhere in the window."""
        L = len(text)
        max_pairs = min(max_pairs, (L - 2) // 4)
        n = int(np.exp(rng.uniform(np.log(2), np.log(max_pairs + 1))))
        n = max(2, min(n, max_pairs))
        room = L - self.length_needed(n, n)
        gap = int(rng.integers(0, room + 1))
        prefix = int(rng.integers(0, room - gap + 1))
        return self.make(rng, text, n, gap, prefix)
