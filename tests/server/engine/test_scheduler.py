from __future__ import annotations

import random

import pytest

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.prefix_index import namespace_root
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.scheduler import Scheduler
from mcserve.server.engine.sequence import Sequence, SequenceStatus
from mcserve.server.errors import QueueFullError
from tests.server.engine.fake_runner import Driver

C = 8


def _cfg(**kw) -> EngineConfig:
    base = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=512, segment_size=C,
                num_state_slots=8, num_checkpoint_blocks=64, utility_decay=0.9)
    return EngineConfig(**{**base, **kw})


def _seq(prompt: list[int], max_tokens: int = 6, session_id: str | None = None, api_key: str | None = None,
         **kw) -> Sequence:
    root = namespace_root(b"engine", session_id=session_id, api_key=api_key)
    return Sequence(prompt, params=SamplingParams(max_tokens=max_tokens), cache_root=root, **kw)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000) for _ in range(n)]


def _prefill_tokens(d: Driver, seq_id: int) -> int:
    return sum(len(c.token_ids) for p in d.plans for c in p.prefill if c.seq_id == seq_id)


def test_chunks_respect_budget_and_end_on_boundaries() -> None:
    d = Driver(_cfg())
    a = d.add(_seq(list(range(1, 101))))  # 100 tokens: chunks of 32, 32, 32, then the last 4
    assert d.step().prefill[0].token_ids == tuple(range(1, 33))
    d.step()
    d.step()
    last = d.step().prefill[0]
    assert (last.start_pos, last.end_pos, last.sample) == (96, 100, True)
    b = d.add(_seq(list(range(200, 240))))  # a decodes now: 31 tokens left, one whole segment fits
    plan = d.step()
    assert len(plan.decode) == 1 and [(c.seq_id, c.start_pos, c.end_pos) for c in plan.prefill] == [(b.seq_id, 0, 24)]
    d.run()
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6


def test_prefix_hit_resumes_at_deepest_boundary() -> None:
    rng = random.Random(0)
    d = Driver(_cfg())
    a = d.add(_seq(_prompt(rng, 100)))
    d.run()
    b = d.add(_seq(a.token_ids[:90] + _prompt(rng, 20)))
    d.run()
    assert b.num_cached_tokens == 88 and _prefill_tokens(d, b.seq_id) == 110 - 88
    # A prompt that ends exactly on a boundary must still compute its last segment's final token.
    c = d.add(_seq(a.token_ids[:96]))
    d.run()
    assert c.num_cached_tokens == 88 and _prefill_tokens(d, c.seq_id) == 8
    counters = d.scheduler.counters
    assert counters["prefix_hit_tokens"] == 176 and counters["prefix_query_tokens"] == 100 + 110 + 96
    restores = [r for p in d.plans for r in p.restores]
    assert len(restores) == 2


def test_reuse_gives_the_tokens_of_a_cold_run() -> None:
    rng = random.Random(1)
    system = _prompt(rng, 45)
    prompts = [system + _prompt(rng, rng.randrange(1, 30)) for _ in range(10)]

    def run(**kw) -> tuple[list[list[int]], int]:
        d = Driver(_cfg(**kw))
        seqs = []
        for i, p in enumerate(prompts):
            seqs.append(d.add(_seq(p, max_tokens=5 + i % 4, arrival_time=float(i))))
            d.step()
        d.run()
        return [s.output_token_ids for s in seqs], d.runner.tokens_computed

    warm, warm_work = run()
    cold, cold_work = run(enable_prefix_caching=False)
    assert warm == cold and warm_work < cold_work - 200


def test_session_cache_needs_the_same_id_and_key() -> None:
    rng = random.Random(2)
    d = Driver(_cfg())
    p = _prompt(rng, 40)
    d.add(_seq(p, session_id="s1", api_key="k1"))
    d.run()
    others = [d.add(_seq(p + [1], session_id="s1", api_key="k2")), d.add(_seq(p + [2], session_id="s2", api_key="k1")),
              d.add(_seq(p + [3]))]
    d.run()
    assert [s.num_cached_tokens for s in others] == [0, 0, 0]
    same = d.add(_seq(p + [4], session_id="s1", api_key="k1"))
    d.run()
    assert same.num_cached_tokens == 40


def test_end_of_turn_snapshot_resumes_exactly() -> None:
    rng = random.Random(3)
    d = Driver(_cfg())
    turn1 = d.add(_seq(_prompt(rng, 37), max_tokens=10, session_id="chat", api_key="k"))
    d.run()
    assert d.scheduler.pool.num_parked == 1
    # The snapshot holds the state after 46 tokens (the last answer token was never fed).
    turn2 = d.add(_seq(turn1.token_ids + _prompt(rng, 5), max_tokens=4, session_id="chat", api_key="k"))
    plan = d.step()
    chunk = plan.prefill[0]
    assert (chunk.start_pos, chunk.end_pos) == (46, 52) and plan.restores == () and plan.resets == ()
    assert chunk.read_blocks == d.scheduler.cache.block_ids(turn2.seq_id, 0, 5)
    assert turn2.num_cached_tokens == 46 and d.scheduler.counters["snapshot_hit"] == 1
    d.run()  # Driver.verify checked the taken-over slot held exactly turn 2's first 46 tokens


def test_snapshot_is_private_to_its_namespace() -> None:
    rng = random.Random(4)
    d = Driver(_cfg())
    turn1 = d.add(_seq(_prompt(rng, 20), session_id="chat", api_key="k"))
    d.run()
    stranger = d.add(_seq(turn1.token_ids + [5], session_id="chat", api_key="other"))
    d.run()
    assert stranger.num_cached_tokens == 0 and d.scheduler.counters["snapshot_hit"] == 0


def test_queue_full_raises() -> None:
    s = Scheduler(_cfg(max_waiting=2))
    s.add_request(_seq([1, 2]))
    s.add_request(_seq([3, 4]))
    with pytest.raises(QueueFullError, match=r"full \(2 requests\)"):
        s.add_request(_seq([5, 6]))
    s.schedule()  # both admitted: room again
    s.add_request(_seq([5, 6]))


def test_context_length() -> None:
    # A prompt that does not fit is refused before the scheduler (errors.check_context_length, test_llm_engine.py).
    d = Driver(_cfg(max_model_len=64))
    seq = d.add(_seq(list(range(60)), max_tokens=100))
    d.run()
    assert seq.finish_reason == "length" and seq.num_tokens == 64


def test_priority_then_arrival_order() -> None:
    d = Driver(_cfg(max_num_seqs=1))
    late_urgent = _seq([1] * 5, priority=0, arrival_time=3.0)
    early = _seq([2] * 5, priority=1, arrival_time=1.0)
    later = _seq([3] * 5, priority=1, arrival_time=2.0)
    for s in (later, early, late_urgent):
        d.add(s)
    d.run()
    firsts = [p.prefill[0].seq_id for p in d.plans if p.prefill]
    assert firsts == [late_urgent.seq_id, early.seq_id, later.seq_id]


def test_abort_frees_everything_in_any_state() -> None:
    rng = random.Random(5)
    d = Driver(_cfg(max_num_seqs=2))
    sched = d.scheduler
    prefilling = d.add(_seq(_prompt(rng, 70), max_tokens=50))
    d.step()
    decoding, waiting = d.add(_seq(_prompt(rng, 10), max_tokens=50)), d.add(_seq(_prompt(rng, 10)))
    assert prefilling.is_prefilling and waiting.status is SequenceStatus.WAITING
    assert sched.abort(prefilling.seq_id) and sched.abort(waiting.seq_id)
    assert not sched.abort(prefilling.seq_id)  # already gone
    d.verify()
    d.step()
    d.step()
    assert decoding.status is SequenceStatus.RUNNING and not decoding.is_prefilling
    assert sched.abort(decoding.seq_id)
    d.verify()
    assert [s.finish_reason for s in (prefilling, waiting, decoding)] == ["abort"] * 3
    assert not sched.has_unfinished() and sched.pool.num_parked == 0 and sched.pool.num_free == 8
    assert sched.cache.num_used_blocks == sched.cache.num_cached_blocks  # nobody holds a block


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    rng = random.Random(6)
    prompts = [_prompt(rng, 60) for _ in range(3)]
    kw = dict(num_checkpoint_blocks=16, evict_running_checkpoints=False, max_model_len=128)

    def run(**extra) -> tuple[list[list[int]], Driver]:
        d = Driver(_cfg(**{**kw, **extra}))
        seqs = [d.add(_seq(p, max_tokens=40)) for p in prompts]
        d.run()
        return [s.output_token_ids for s in seqs], d

    out, d = run()
    assert d.scheduler.counters["preempt"] > 0 and d.scheduler.counters["offload"] == 0
    assert out == run(num_checkpoint_blocks=64)[0]
    assert any(p.preempted for p in d.plans)


def test_offload_and_onload_under_pressure() -> None:
    rng = random.Random(7)
    prompts = [_prompt(rng, 60) for _ in range(3)]
    d = Driver(_cfg(num_checkpoint_blocks=16, num_host_blocks=16), weight_fn=lambda block, seg: 1.0 + seg)
    seqs = [d.add(_seq(p, max_tokens=20 * (i + 1))) for i, p in enumerate(prompts)]
    d.run()
    c = d.scheduler.counters
    assert c["offload"] > 0 and c["onload"] > 0 and c["drop_running"] == 0
    assert any(-1 in r.block_table for p in d.plans for r in p.decode)  # holes while offloaded
    cold = Driver(_cfg())
    cold_seqs = [cold.add(_seq(p, max_tokens=20 * (i + 1))) for i, p in enumerate(prompts)]
    cold.run()
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in cold_seqs]


def test_drop_running_checkpoints_without_host_memory() -> None:
    rng = random.Random(8)
    d = Driver(_cfg(num_checkpoint_blocks=12))
    for _ in range(3):
        d.add(_seq(_prompt(rng, 60), max_tokens=40))
    d.run()
    c = d.scheduler.counters
    assert c["drop_running"] > 0 and c["offload"] == 0
    assert any(-1 in r.block_table for p in d.plans for r in p.decode)


def test_update_skips_rows_of_sequences_gone_mid_step() -> None:
    d = Driver(_cfg())
    a, b = d.add(_seq(list(range(1, 21)))), d.add(_seq(list(range(50, 60))))
    plan = d.scheduler.schedule()
    out = d.runner.execute(plan)
    d.scheduler.abort(a.seq_id)
    assert d.scheduler.update(plan, out) == [b]
    d.verify()
    stats = d.scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.state_slots_running, stats.state_slots_parked) == (1, 0, 1, 0)
    assert stats.checkpoint_blocks_running == 1 and stats.checkpoint_blocks_total == 64  # b's segment 0
    assert stats.checkpoint_blocks_cached == 0  # a's block was never indexed: freed with it
