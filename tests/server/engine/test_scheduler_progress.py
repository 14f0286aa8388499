"""Property: under every configuration `EngineConfig` accepts, the scheduler makes progress.

Model-free (the fake runner checks every plan's reads and writes): random pool sizes down to the
smallest accepted, token budgets, slots, eviction and caching switches, and workloads built to
fill the pool with one prompt's cached checkpoints before a longer copy of it arrives (the shape
of issue 9's livelock). No two plans in a row may be empty while requests are unfinished, every
request finishes, and nothing is held at the end.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.prefix_index import namespace_root
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.sequence import Sequence
from tests.server.engine.fake_runner import Driver

C = 8


@st.composite
def configs(draw) -> EngineConfig:
    seqs = draw(st.integers(1, 4))
    max_len = draw(st.sampled_from([64, 96, 160]))
    evict_running = draw(st.booleans())
    least = 2 if evict_running else max_len // C  # what EngineConfig accepts
    return EngineConfig(
        max_num_seqs=seqs, max_num_batched_tokens=draw(st.sampled_from([C, C + 3, 2 * C, 5 * C])),
        max_model_len=max_len, max_waiting=64, segment_size=C, num_state_slots=seqs + draw(st.integers(0, 2)),
        num_checkpoint_blocks=least + draw(st.integers(0, 6)), num_host_blocks=draw(st.sampled_from([0, 0, 2, 8])),
        utility_decay=draw(st.sampled_from([1.0, 0.9])), enable_prefix_caching=draw(st.booleans()),
        enable_snapshots=draw(st.booleans()), evict_running_checkpoints=evict_running)


# (base prompt, extra tokens after it, max_tokens, arrival gap in steps, key)
requests = st.tuples(st.integers(0, 2), st.integers(0, 20), st.integers(1, 12), st.integers(0, 12),
                     st.sampled_from([None, "a"]))


@settings(max_examples=4 * settings.default.max_examples)
@given(configs(), st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=90), min_size=3, max_size=3),
       st.lists(requests, min_size=1, max_size=12))
def test_every_accepted_configuration_makes_progress(cfg: EngineConfig, bases, reqs) -> None:
    d = Driver(cfg)
    pending = list(reqs)
    seqs, gap, empty_in_a_row, steps = [], 0, 0, 0
    while pending or d.scheduler.has_unfinished():
        if pending and gap >= pending[0][3]:
            base, extra, max_tokens, _, key = pending.pop(0)
            prompt = (bases[base] + list(range(1000, 1000 + extra)))[:cfg.max_model_len - 1]
            seqs.append(d.add(Sequence(prompt, params=SamplingParams(max_tokens=max_tokens), arrival_time=steps,
                                       cache_root=namespace_root(b"engine", api_key=key))))
            gap = 0
        plan = d.step()
        empty = plan.is_empty and d.scheduler.has_unfinished()
        empty_in_a_row = empty_in_a_row + 1 if empty else 0
        assert empty_in_a_row < 2, (steps, d.scheduler.stats(), d.scheduler.waiting)
        gap, steps = gap + 1, steps + 1
        assert steps < 5000
    assert all(s.is_finished for s in seqs)
    cache, pool = d.scheduler.cache, d.scheduler.pool
    assert cache.num_tables == 0 and cache.num_cached_blocks == cache.num_used_blocks and pool.num_held == 0
