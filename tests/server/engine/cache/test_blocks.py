from __future__ import annotations

import pytest

from mcserve.server.engine.cache.blocks import BlockPool
from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.errors import ConfigError, count_in_budget


def test_pool_hands_out_low_ids_first_and_reuses_the_last_freed() -> None:
    pool = BlockPool(3)
    a, b, c = (Checkpoint(i, 0) for i in range(3))
    assert [pool.take(a), pool.take(b), pool.take(c)] == [0, 1, 2]
    assert pool.take(Checkpoint(3, 0)) is None and pool.num_free == 0 and len(pool) == 3
    assert pool.owner(1) is b and set(pool) == {a, b, c}
    pool.give_back(2)
    pool.give_back(0)
    assert pool.take(c) == 0 and pool.owner(0) is c and pool.owner(2) is None
    pool.check("test")


def test_block_given_back_later_is_free_only_next_step() -> None:
    pool = BlockPool(1)
    x = Checkpoint(0, 0)
    assert pool.take(x) == 0
    pool.give_back(0, later=True)  # the source of a copy this step
    assert pool.num_free == 0 and pool.take(x) is None and len(pool) == 0
    pool.check("test")
    pool.begin_step()
    assert pool.take(x) == 0


def test_check_sees_a_leak() -> None:
    pool = BlockPool(2)
    pool.take(Checkpoint(0, 0))
    pool._free.clear()  # simulate a lost block
    with pytest.raises(AssertionError, match="leaked"):
        pool.check("GPU")


def test_count_in_budget_blocks() -> None:
    assert count_in_budget("checkpoint memory budget", 1000, "blocks", 10, 50) == 100
    with pytest.raises(ConfigError, match="holds 9 blocks of 100 bytes, fewer than the 64 required"):
        count_in_budget("checkpoint memory budget", 999, "blocks", 100, 64)
