"""`CheckpointCache.has_hole` (O(1), kept by the tables as entries leave and regain the GPU) against
scanning the table, over random admissions, growth with offload/drop, onloads, cuts, releases and
forgotten prefixes on the real cache."""

from __future__ import annotations

import random
from collections import Counter

from mcserve.server.engine.cache.cache import CheckpointCache


def _key(prefix: bytes, i: int) -> bytes:
    return prefix + str(i).encode()


def _scan(cache: CheckpointCache, seq_id: int) -> bool:
    return -1 in cache.block_ids(seq_id, 0, cache.table_len(seq_id))


def _run(seed: int, seen: Counter[str]) -> Counter[str]:
    rng = random.Random(seed)
    cache = CheckpointCache(rng.randint(3, 9), num_host_blocks=rng.randint(0, 4), decay=rng.choice([1.0, 0.9]))
    live: dict[int, bytes] = {}  # seq id -> the prompt chain it follows
    next_id, step = 0, 1
    cache.begin_step(step)
    for _ in range(300):
        op = rng.choice(["admit", "grow", "grow", "grow", "onload", "weights", "cut", "release", "forget", "step"])
        sid = rng.choice(list(live)) if live else None
        if op == "admit" or sid is None:
            prefix = rng.choice([b"a", b"b", b"c"])
            n = rng.randint(1, 6)
            hits = cache.match([_key(prefix, i) for i in range(n + 1)], n)
            seen["offloaded_hits"] += any(c.gpu is None for c in hits)
            cache.attach(next_id, hits)
            live[next_id], next_id = prefix, next_id + 1
        elif op == "grow":
            segment = cache.table_len(sid)
            if cache.allocate(sid, evict_running=rng.random() < 0.8) and rng.random() < 0.7:
                cache.register(sid, segment, _key(live[sid], segment + 1), _key(live[sid], segment))
        elif op == "onload":
            had = cache.has_hole(sid)
            cache.onload_holes(sid)
            seen["hole_filled"] += had and not cache.has_hole(sid)
        elif op == "weights":
            blocks = [b for s in live for b in cache.block_ids(s, 0, cache.table_len(s)) if b >= 0]
            cache.add_weights({b: rng.random() for b in rng.sample(blocks, min(3, len(blocks)))})
        elif op == "cut":
            cache.release_from(sid, rng.randint(0, cache.table_len(sid)))
        elif op == "release":
            cache.release(sid)
            del live[sid]
        elif op == "forget":
            prefix = rng.choice([b"a", b"b", b"c"])
            cache.forget_prefix([_key(prefix, i) for i in range(rng.randint(1, 5) + 1)])
        else:
            step += 1
            cache.begin_step(step)
            cache.take_transfers()
        for s in live:
            assert cache.has_hole(s) == _scan(cache, s), (seed, op, s)
            seen["with_hole"] += cache.has_hole(s)
        assert not cache.has_hole(next_id) and not any(cache.has_hole(s) for s in range(next_id) if s not in live)
        cache.check()
    return cache.counters


def test_has_hole_agrees_with_scanning_the_table() -> None:
    seen: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    for seed in range(40):
        counters += _run(seed, seen)
    # the runs made holes every way there is, and filled them
    assert min(counters["offload"], counters["drop_running"], counters["onload"]) > 0, counters
    assert min(seen["with_hole"], seen["hole_filled"], seen["offloaded_hits"]) > 0, seen
