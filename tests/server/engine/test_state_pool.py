from __future__ import annotations

import pytest

from mcserve.server.engine.state_pool import StatePool
from mcserve.server.errors import ConfigError, count_in_budget


def test_alloc_free_until_exhausted() -> None:
    pool = StatePool(3)
    slots = [pool.alloc() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and pool.alloc() is None and pool.num_held == 3
    pool.free(slots[1])
    assert pool.alloc() == slots[1]
    pool.check(set(slots))
    with pytest.raises(AssertionError):
        pool.free(7)


def test_find_returns_longest_matching_snapshot_within_limit() -> None:
    pool = StatePool(4)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    tokens = [1, 2, 3, 4, 5, 6, 7]
    pool.park(a, b"h1", [5], 5)  # state after 5 tokens; segment 1 starts at 4
    pool.park(b, b"h1", [5, 6, 7], 7)
    pool.park(c, b"h1", [5, 9], 6)  # diverges from the prompt
    assert pool.num_parked == 3 and pool.num_held == 0
    assert pool.find(b"h1", tokens, 4, max_tokens=6).num_tokens == 5
    assert pool.find(b"h1", tokens + [8], 4, max_tokens=7).num_tokens == 7
    assert pool.find(b"h2", tokens, 4, max_tokens=6) is None
    snap = pool.find(b"h1", tokens, 4, max_tokens=6)
    assert pool.take(snap) == a and pool.num_held == 1
    assert pool.find(b"h1", tokens, 4, max_tokens=6) is None
    assert pool.counters["snapshot_hit"] == 1
    pool.check({a})


def test_alloc_evicts_oldest_snapshot_and_park_replaces_duplicates() -> None:
    pool = StatePool(2)
    a, b = pool.alloc(), pool.alloc()
    pool.park(a, b"x", [1], 1)
    pool.park(b, b"x", [2], 1)
    assert pool.alloc() == a  # oldest parked goes first
    assert pool.counters["snapshot_evict"] == 1 and pool.num_parked == 1
    pool.park(a, b"x", [2], 1)  # same prefix as b's snapshot: replaces it
    assert pool.num_parked == 1 and pool.num_free == 1 and pool.find(b"x", [2, 3], 0, 1).slot == a
    pool.check(set())


def test_count_in_budget_slots() -> None:
    assert count_in_budget("--state-memory", 64_500, "state slots", 1000, 64, " (max_num_seqs=64)") == 64
    with pytest.raises(ConfigError) as e:
        count_in_budget("--state-memory", 50_000_000, "state slots", 1_000_000, 64, " (max_num_seqs=64)")
    msg = str(e.value)
    assert "holds 50 state slots of 1000000 bytes" in msg and "max_num_seqs=64" in msg and "64000000" in msg
