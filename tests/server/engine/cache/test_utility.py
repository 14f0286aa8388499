from __future__ import annotations

import math

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.cache.utility import IdleHeap, UtilityPolicy


def test_utility_decays_and_rank_does_not_depend_on_now() -> None:
    policy = UtilityPolicy(0.5)
    a, b = Checkpoint(0, 0), Checkpoint(0, 0)
    policy.credit(a, 8.0)
    policy.now = 3
    policy.credit(b, 2.0)
    assert math.isclose(policy.value(a), 1.0) and math.isclose(policy.value(b), 2.0)
    before = policy.rank(a) < policy.rank(b)
    policy.now = 50
    policy.rebase(a)  # folding the decay in keeps the order
    assert before and policy.rank(a) < policy.rank(b) and policy.lowest([b, a]) is a


def test_rank_breaks_ties_by_age_then_depth() -> None:
    policy = UtilityPolicy(1.0)
    old, deep, shallow = Checkpoint(0, 0), Checkpoint(5, 1), Checkpoint(1, 1)
    assert policy.lowest([shallow, deep, old]) is old
    assert policy.lowest([shallow, deep]) is deep


def test_idle_heap_skips_stale_entries() -> None:
    policy = UtilityPolicy(1.0)
    heap = IdleHeap(policy, num_blocks=1)
    cs = [Checkpoint(i, 0) for i in range(3)]
    for c, w in zip(cs, (3.0, 1.0, 2.0), strict=True):
        policy.credit(c, w)
        heap.push(c)
    cs[1].version += 1  # changed since it was pushed
    assert [heap.pop(), heap.pop(), heap.pop()] == [cs[2], cs[0], None]
    for _ in range(200):  # stale entries do not pile up past the bound
        cs[0].version += 1
        heap.push(cs[0])
    assert len(heap._heap) <= 4 + 64


def test_rate_compares_checkpoints_of_different_ages_fairly() -> None:
    policy = UtilityPolicy(0.9)
    old, young = Checkpoint(0, 0), Checkpoint(1, 8)
    for step in range(10):  # both read 1.0 per step while alive, the young one for 2 steps
        policy.now = step
        for c in (old, young):
            if step >= c.born:
                policy.credit(c, 1.0)
    policy.now = 10
    assert policy.value(young) < policy.value(old)  # the decayed sum favours the old one
    assert abs(policy.rate(young) - policy.rate(old)) < 1e-9  # the rate does not
    assert policy.rate(Checkpoint(2, 10)) == math.inf  # not a step old: no evidence yet
    policy.credit(young, 0.5)
    assert policy.lowest_rate([young, old]) is old
