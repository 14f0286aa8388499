"""Router weights handed over as one array (`CheckpointCache.add_block_weights`: held blocks' shares wait
in `PendingWeights` until the checkpoint's utility is read) against crediting every entry at once
(`add_weights`, what the cache did before): two real caches driven by the same random admissions,
growth with eviction, offload and drop, onloads, cuts, releases, forgotten prefixes and hand-overs
(every few steps, and from `weights_source` before a victim is picked) must make the same
decisions and hold the same utilities."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np

from mcserve.server.engine.cache.cache import CheckpointCache


def _key(prefix: bytes, i: int) -> bytes:
    return prefix + str(i).encode()


class _Device:
    """What a runner keeping the weights does: a sum per block, decayed every step, handed over whole."""

    def __init__(self, decay: float, blocks: int) -> None:
        self.decay, self.blocks, self.acc, self.step = decay, blocks, {}, 0

    def begin(self, step: int) -> None:
        self.acc = {b: w * self.decay ** (step - self.step) for b, w in self.acc.items()}
        self.step = step

    def take(self) -> np.ndarray:
        out = np.zeros(self.blocks, dtype=np.float64)
        out[list(self.acc)] = list(self.acc.values())
        self.acc = {}
        return out


def _state(cache: CheckpointCache, live: list[int]) -> tuple:
    tables = {s: cache.block_ids(s, 0, cache.table_len(s)) for s in live}
    gpu = sorted((c.gpu, c.segment, c.key, c.refs) for c in cache.gpu)
    host = sorted((c.host, c.segment, c.key, c.refs) for c in cache.host)
    return tables, gpu, host, dict(cache.counters), cache.num_held_blocks


def _utilities(cache: CheckpointCache) -> dict[tuple[str, int], float]:
    out = {("gpu", c.gpu): cache.utility(c) for c in cache.gpu}
    out.update({("host", c.host): cache.utility(c) for c in cache.host})
    return out


def _run(seed: int) -> Counter[str]:
    rng = random.Random(seed)
    decay = rng.choice([1.0, 0.9])
    blocks, host = rng.randint(4, 12), rng.randint(0, 4)
    old, new = CheckpointCache(blocks, host, decay), CheckpointCache(blocks, host, decay)
    dev_old, dev_new = _Device(decay, blocks), _Device(decay, blocks)
    old.weights_source, new.weights_source = dev_old.take, dev_new.take
    # the old path: every entry of a hand-over credited at once
    old.add_block_weights = lambda w: old.add_weights({b: x for b, x in enumerate(w.tolist()) if x > 0})
    live: list[int] = []
    prefixes: dict[int, bytes] = {}
    next_id, step, seen = 0, 1, Counter()
    for cache in (old, new):
        cache.begin_step(step)
    for _ in range(250):
        op = rng.choice(["admit", "grow", "grow", "grow", "onload", "read", "read", "cut", "release", "forget",
                         "step", "step"])
        sid = rng.choice(live) if live else None
        if op == "admit" or sid is None:
            prefix = rng.choice([b"a", b"b", b"c"])
            n = rng.randint(1, 6)
            for cache in (old, new):
                cache.attach(next_id, cache.match([_key(prefix, i) for i in range(n + 1)], n))
            live.append(next_id)
            prefixes[next_id], next_id = prefix, next_id + 1
        elif op == "grow":
            evict, register = rng.random() < 0.8, rng.random() < 0.7
            for cache in (old, new):
                segment = cache.table_len(sid)
                if cache.allocate(sid, evict_running=evict) and register:
                    cache.register(sid, segment, _key(prefixes[sid], segment + 1), _key(prefixes[sid], segment))
        elif op == "onload":
            for cache in (old, new):
                cache.onload_holes(sid)
        elif op == "read":  # a step's router weights on some blocks of the live tables
            held = sorted({b for s in live for b in new.block_ids(s, 0, new.table_len(s)) if b >= 0})
            for b in rng.sample(held, min(rng.randint(1, 6), len(held))):
                w = rng.random()
                for dev in (dev_old, dev_new):
                    dev.acc[b] = dev.acc.get(b, 0.0) + w
        elif op == "cut":
            start = rng.randint(0, new.table_len(sid))
            for cache in (old, new):
                cache.release_from(sid, start)
        elif op == "release":
            for cache in (old, new):
                cache.release(sid)
            live.remove(sid)
        elif op == "forget":
            hashes = [_key(rng.choice([b"a", b"b", b"c"]), i) for i in range(rng.randint(1, 5) + 1)]
            for cache in (old, new):
                cache.forget_prefix(hashes)
        else:
            step += 1
            for cache, dev in ((old, dev_old), (new, dev_new)):
                cache.begin_step(step)
                cache.take_transfers()
                dev.begin(step)
                if step % 3 == 0:  # the engine's periodic hand-over
                    cache.add_block_weights(dev.take())
        seen["pending"] += bool(new._pending.blocks())
        assert _state(old, live) == _state(new, live), (seed, op)
        if rng.random() < 0.2:  # reading utilities credits the pending shares: only now and then
            u_old, u_new = _utilities(old), _utilities(new)
            assert u_old.keys() == u_new.keys()
            for k, u in u_old.items():
                assert math.isclose(u, u_new[k], rel_tol=1e-9, abs_tol=1e-12), (seed, op, k, u, u_new[k])
        new.check()
    seen.update(new.counters)
    return seen


def test_pending_weights_decide_as_crediting_at_once() -> None:
    seen: Counter[str] = Counter()
    for seed in range(40):
        seen += _run(seed)
    # the runs kept shares pending, evicted idle blocks and held ones (offload and drop), and onloaded
    assert min(seen["pending"], seen["evict_idle"], seen["offload"], seen["drop_running"], seen["onload"]) > 0, seen
