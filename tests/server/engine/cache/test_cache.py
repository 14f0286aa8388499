from __future__ import annotations

import math

from mcserve.server.engine.cache.cache import CheckpointCache
from mcserve.server.engine.plan import BlockCopy


def _key(prefix: bytes, i: int) -> bytes:
    return prefix + str(i).encode()  # stands for h_i of a prompt whose chain is named `prefix`


def _chain(prefix: bytes, n: int) -> list[bytes]:
    return [_key(prefix, i) for i in range(n + 1)]


def _fill(cache: CheckpointCache, seq_id: int, prefix: bytes, n: int, evict_running: bool = False) -> list[int]:
    """Give seq_id n written, indexed checkpoints; returns their GPU blocks."""
    start = cache.table_len(seq_id)
    for i in range(start, start + n):
        assert cache.allocate(seq_id, evict_running)
        cache.register(seq_id, i, _key(prefix, i + 1), _key(prefix, i))
    return list(cache.block_ids(seq_id, start, start + n))


def test_refcounts_prefix_match_and_release() -> None:
    cache = CheckpointCache(4)
    cache.begin_step(1)
    blocks = _fill(cache, 0, b"a", 3)
    hits = cache.match(_chain(b"a", 3), limit=3)
    assert [c.gpu for c in hits] == blocks
    assert len(cache.match(_chain(b"a", 3), limit=2)) == 2
    assert cache.match(_chain(b"z", 3), limit=3) == []
    assert cache.attach(1, hits[:2]) == 2 and [c.refs for c in hits] == [2, 2, 1]
    assert cache.allocate(1, evict_running=False)  # seq 1 diverges: private, unindexed block
    cache.release(0)
    cache.release(1)
    cache.check()
    # Indexed blocks stay cached with no holder; the unindexed one went back to the pool.
    assert cache.num_used_blocks == 3 and cache.num_cached_blocks == 3 and cache.num_free_blocks == 1
    assert [c.gpu for c in cache.match(_chain(b"a", 3), 3)] == blocks


def test_duplicate_prefix_stays_private() -> None:
    cache = CheckpointCache(4)
    cache.begin_step(1)
    first = _fill(cache, 0, b"a", 1)
    _fill(cache, 1, b"a", 1)  # the same prefix computed concurrently
    assert [c.gpu for c in cache.match(_chain(b"a", 1), 1)] == first
    cache.release(1)
    assert cache.num_used_blocks == 1
    cache.check()


def test_idle_eviction_follows_utility() -> None:
    cache = CheckpointCache(3, decay=1.0)
    cache.begin_step(1)
    blocks = {p: _fill(cache, s, p, 1)[0] for s, p in enumerate((b"a", b"b", b"c"))}
    cache.add_weights({blocks[b"a"]: 5.0, blocks[b"b"]: 1.0, blocks[b"c"]: 3.0})
    for s in range(3):
        cache.release(s)
    cache.begin_step(2)
    order = []
    for _ in range(3):
        assert cache.allocate(9, evict_running=False)
        order.append(next(p for p in (b"a", b"b", b"c") if not cache.match(_chain(p, 1), 1) and p not in order))
    assert order == [b"b", b"c", b"a"] and cache.counters["evict_idle"] == 3
    cache.check()


def test_utility_decays_with_time() -> None:
    cache = CheckpointCache(2, decay=0.5)
    cache.begin_step(1)
    a = _fill(cache, 0, b"a", 1)[0]
    cache.add_weights({a: 8.0})
    cache.begin_step(10)
    b = _fill(cache, 1, b"b", 1)[0]
    cache.add_weights({b: 1.0})
    cache.release(0)
    cache.release(1)
    cache.begin_step(11)
    hits = cache.match(_chain(b"a", 1), 1)
    assert math.isclose(cache.utility(hits[0]), 8.0 * 0.5**10)
    assert cache.allocate(2, evict_running=False)
    assert cache.match(_chain(b"a", 1), 1) == [] and cache.match(_chain(b"b", 1), 1) != []


def test_idle_eviction_takes_leaves_first() -> None:
    cache = CheckpointCache(3, decay=1.0)
    cache.begin_step(1)
    parent, child = _fill(cache, 0, b"p", 2)
    other = _fill(cache, 1, b"q", 1)[0]
    cache.add_weights({parent: 0.1, child: 10.0, other: 5.0})
    cache.release(0)
    cache.release(1)
    cache.begin_step(2)
    assert cache.allocate(5, False) and cache.match(_chain(b"q", 1), 1) == []
    assert cache.allocate(5, False) and len(cache.match(_chain(b"p", 2), 2)) == 1  # the child went
    assert cache.allocate(5, False) and cache.match(_chain(b"p", 2), 2) == []  # then its parent
    assert not cache.allocate(5, False)
    cache.check()


def test_pinned_blocks_survive_their_step() -> None:
    cache = CheckpointCache(1)
    cache.begin_step(1)
    _fill(cache, 0, b"a", 1)
    cache.release(0)
    cache.begin_step(2)
    assert cache.attach(1, cache.match(_chain(b"a", 1), 1)) == 1
    cache.pin(1, 0)  # a restore source
    cache.release(1)  # e.g. the sequence was preempted later in the same step
    assert not cache.allocate(2, evict_running=True)
    cache.begin_step(3)
    assert cache.allocate(2, evict_running=False) and cache.counters["evict_idle"] == 1


def test_failed_admission_leaves_its_hits_evictable() -> None:
    cache = CheckpointCache(1)
    cache.begin_step(1)
    _fill(cache, 0, b"a", 1)
    cache.release(0)
    cache.begin_step(2)
    assert cache.attach(1, cache.match(_chain(b"a", 1), 1)) == 1
    assert not cache.allocate(1, evict_running=False)  # held by the admission itself
    cache.release(1)  # the admission gives its hit back ...
    assert cache.allocate(2, evict_running=False)  # ... and the block can serve a colder start at once
    assert cache.counters["evict_idle"] == 1
    cache.check()


def test_newest_checkpoint_of_a_sequence_is_spared() -> None:
    cache = CheckpointCache(3, decay=1.0)
    cache.begin_step(1)
    old, _, newest = _fill(cache, 0, b"a", 3)
    cache.add_weights({old: 5.0, 1: 1.0})  # the newest has not been read yet
    cache.begin_step(2)
    assert cache.allocate(1, evict_running=True)
    assert cache.block_ids(0, 0, 3) == (old, -1, newest)  # the least-read older one went


def test_offload_and_onload_round_trip() -> None:
    cache = CheckpointCache(2, num_host_blocks=2, decay=1.0)
    cache.begin_step(1)
    low, high = _fill(cache, 0, b"a", 2)
    cache.add_weights({low: 1.0, high: 2.0})
    assert cache.take_transfers() == ((), ())
    cache.begin_step(2)
    assert not cache.allocate(1, evict_running=False)  # idle blocks only: none
    assert cache.allocate(1, evict_running=True)  # offloads seq 0's least-used checkpoint
    offloads, onloads = cache.take_transfers()
    assert offloads == (BlockCopy(low, offloads[0].dst),) and onloads == ()
    assert cache.block_ids(0, 0, 2) == (-1, high) and cache.block_ids(1, 0, 1) == (low,)
    cache.onload_holes(0)  # not in the step that offloaded it
    assert cache.take_transfers() == ((), ())
    cache.release(1)
    cache.check()
    cache.begin_step(3)
    cache.onload_holes(0)
    offloads2, onloads2 = cache.take_transfers()
    assert offloads2 == () and onloads2 == (BlockCopy(offloads[0].dst, low),)
    assert cache.block_ids(0, 0, 2) == (low, high)
    assert cache.counters["offload"] == 1 and cache.counters["onload"] == 1
    assert len(cache.match(_chain(b"a", 2), 2)) == 2  # stayed indexed throughout
    cache.check()


def test_drop_when_host_pool_is_full() -> None:
    cache = CheckpointCache(2, num_host_blocks=0, decay=1.0)
    cache.begin_step(1)
    low, high = _fill(cache, 0, b"a", 2)
    cache.add_weights({low: 1.0, high: 2.0})
    cache.begin_step(2)
    assert cache.allocate(1, evict_running=True)
    assert cache.take_transfers() == ((), ())
    assert cache.block_ids(0, 0, 2) == (-1, high) and cache.counters["drop_running"] == 1
    assert cache.match(_chain(b"a", 2), 2) == []  # the chain is broken at segment 0
    cache.begin_step(3)
    cache.onload_holes(0)  # nothing to bring back
    assert cache.block_ids(0, 0, 2) == (-1, high)
    cache.release(0)
    cache.release(1)
    cache.check()


def test_host_pool_evicts_idle_checkpoints() -> None:
    cache = CheckpointCache(2, num_host_blocks=1, decay=1.0)
    cache.begin_step(1)
    a = _fill(cache, 0, b"a", 1)[0]
    b = _fill(cache, 1, b"b", 1)[0]
    cache.add_weights({a: 1.0, b: 2.0})
    cache.begin_step(2)
    assert cache.allocate(2, evict_running=True)  # offloads a
    cache.release(0)  # a now idle on the host
    cache.release(2)
    cache.begin_step(3)
    assert cache.allocate(3, evict_running=True)  # the free block
    assert cache.allocate(3, evict_running=True)  # offloads b, evicting idle a from the host
    assert cache.counters["evict_host"] == 1 and cache.counters["offload"] == 2
    assert cache.match(_chain(b"a", 1), 1) == [] and cache.block_ids(1, 0, 1) == (-1,)
    cache.check()


def test_attach_onloads_cached_offloaded_prefix() -> None:
    cache = CheckpointCache(3, num_host_blocks=2, decay=1.0)
    cache.begin_step(1)
    low, high = _fill(cache, 0, b"a", 2)
    cache.add_weights({low: 1.0, high: 2.0})
    cache.begin_step(2)
    assert cache.allocate(1, True) and cache.allocate(1, True)  # free block, then offload `low`
    cache.take_transfers()
    cache.release(0)
    cache.release(1)
    cache.begin_step(3)
    hits = cache.match(_chain(b"a", 2), 2)
    assert [c.gpu for c in hits] == [None, high]
    assert cache.attach(7, hits) == 2
    assert cache.take_transfers()[1] == (BlockCopy(0, hits[0].gpu),)
    assert -1 not in cache.block_ids(7, 0, 2)
    cache.release(7)
    cache.check()


def test_attach_stops_where_onload_is_impossible() -> None:
    cache = CheckpointCache(2, num_host_blocks=2, decay=1.0)
    cache.begin_step(1)
    low, high = _fill(cache, 0, b"a", 2)
    cache.add_weights({low: 1.0, high: 2.0})
    cache.begin_step(2)
    assert cache.allocate(1, True)  # offloads `low`; seq 1 keeps its block
    cache.release(0)
    cache.begin_step(3)
    # Segment 0 is on the host and no GPU block can be freed without touching held ones.
    assert cache.attach(7, cache.match(_chain(b"a", 2), 2)) == 0
    cache.release(7)
    cache.release(1)
    cache.check()
