"""A randomized mix of arrivals (shared prefixes, chat follow-ups, sessions), stops, aborts,
preemption and eviction, with every invariant checked after every step (Driver.verify: ownership,
refcounts, and the fake runner's slot/block contents against each sequence's tokens)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.prefix_index import namespace_root
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.sequence import Sequence
from mcserve.server.errors import QueueFullError
from tests.server.engine.fake_runner import Driver

VARIANTS = {
    "offload": dict(num_checkpoint_blocks=32, num_host_blocks=8),
    "drop": dict(num_checkpoint_blocks=32),
    "preempt": dict(num_checkpoint_blocks=24, evict_running_checkpoints=False),
    "no_prefix_cache": dict(num_checkpoint_blocks=24, num_host_blocks=4, enable_prefix_caching=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_mix_leaves_nothing_behind(variant: str) -> None:
    rng = random.Random(1234)
    cfg = EngineConfig(max_num_seqs=6, max_num_batched_tokens=48, max_model_len=160, max_waiting=12,
                       segment_size=8, num_state_slots=9, utility_decay=0.95, **VARIANTS[variant])
    d = Driver(cfg, weight_fn=lambda block, seg: ((block * 7 + seg) % 5) / 4)
    sched = d.scheduler
    systems = [[rng.randrange(1000) for _ in range(rng.randrange(8, 40))] for _ in range(3)]
    keys: dict[int, tuple[str | None, str | None]] = {}
    aborted_in = Counter()
    rejected = 0

    def new_request() -> Sequence:
        tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 16))]
        kind = rng.random()
        session = rng.choice([(None, None), ("s1", "k1"), ("s1", "k2")])
        done = [s for s in d.finished.values() if s.num_tokens + len(tail) < cfg.max_model_len - 1]
        if kind < 0.35 and done:  # the next turn of a finished chat
            prev = rng.choice(done)
            prompt, session = prev.token_ids + tail, keys[prev.seq_id]
        elif kind < 0.75:
            prompt = rng.choice(systems) + tail
        else:
            prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 60))]
        seq = Sequence(prompt, params=SamplingParams(max_tokens=rng.randrange(1, 40)), priority=rng.randrange(2),
                       arrival_time=float(len(keys)),
                       cache_root=namespace_root(b"engine", session_id=session[0], api_key=session[1]))
        keys[seq.seq_id] = session
        return seq

    for _ in range(400):
        for _ in range(rng.choice([0, 0, 0, 0, 1, 2])):
            try:
                d.add(new_request())
            except QueueFullError:
                rejected += 1
        live = sched.running + sched.waiting
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            state = victim.status.name + ("/prefill" if victim.is_prefilling else "")
            assert sched.abort(victim.seq_id)
            aborted_in[state] += 1
            d.verify()
        d.step()
    d.run()

    c = sched.counters
    assert rejected > 0 and c["finish_stop"] > 60 and aborted_in["WAITING"] and aborted_in["RUNNING"]
    if variant == "offload":
        assert c["offload"] and c["onload"] and c["evict_idle"]
    if variant == "drop":
        assert c["drop_running"] and not c["offload"]
    if variant == "preempt":
        assert c["preempt"] and aborted_in["PREEMPTED"] and not (c["drop_running"] or c["offload"])
    if variant == "no_prefix_cache":
        assert c["prefix_hit_tokens"] == 0 and sched.cache.num_used_blocks == 0 and sched.pool.num_parked == 0
    else:
        assert c["prefix_hit_tokens"] > 500
    # Nothing held, nothing leaked: every slot and block is free or cached.
    cache, pool = sched.cache, sched.pool
    sched.check()
    assert pool.num_held == 0 and pool.num_free + pool.num_parked == pool.num_slots
    assert cache.num_free_blocks + cache.num_used_blocks == cache.num_blocks
    assert cache.num_cached_blocks == cache.num_used_blocks and cache.num_tables == 0
