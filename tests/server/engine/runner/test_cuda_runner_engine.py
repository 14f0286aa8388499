"""The engine with the CUDA runner (on CPU: its host logic with the torch decode path) against the
torch runner, through the real scheduler: its tables come only from the plans' diffs (decode rows
carry none) and its router weights reach the cache only when pulled, through prefix reuse,
preemption, and a checkpoint offloaded and onloaded again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import GREEDY, Recorder, generate, make_engine, random_prompts, tokens

CUDA = RunnerOptions("cuda")


def test_greedy_tokens_equal_through_reuse_and_preemption(model, tokenizer) -> None:
    prompts = random_prompts(4, [50, 33, 70, 20, 41])
    params = dataclasses.replace(GREEDY, max_tokens=30)
    for overrides in ({}, dict(max_num_seqs=4, max_model_len=128, num_checkpoint_blocks=8, num_state_slots=4,
                               evict_running_checkpoints=False)):
        ref_engine = make_engine(model, tokenizer, **overrides)
        engine = make_engine(model, tokenizer, runner=CUDA, **overrides)
        rec = Recorder(engine)
        want, got = tokens(generate(ref_engine, prompts, params)), tokens(generate(engine, prompts, params))
        assert got == want
        # a second turn that reuses the first turn's checkpoints
        turn2 = [p + w[:10] + [7, 8, 9] for p, w in zip(prompts, want, strict=True)]
        assert tokens(generate(engine, turn2, params)) == tokens(generate(ref_engine, turn2, params))
        assert all(not r.block_table for plan, _ in rec.steps for r in plan.decode)
        assert any(plan.table_appends for plan, _ in rec.steps) and any(plan.released for plan, _ in rec.steps)
        if overrides:
            assert engine.counters["preempt"] > 0
        assert engine.counters["prefix_hit_tokens"] > 0
        engine.scheduler.check()


@pytest.fixture(scope="module")
def ssc_k1(model_dir):
    return load_model(model_dir, dtype=torch.float32, device="cpu", segment_size=8, top_k=1)


def test_offloaded_victim_is_unselected_and_comes_back(ssc_k1, tokenizer) -> None:
    """One block short: the running sequence offloads the checkpoint with the lowest utility, which
    the cache can know only from the weights it pulls from the runner before picking the victim;
    a second request onloads it (a table update) and both outputs equal the torch runner's."""
    prompt = random_prompts(0, [120] * 4)[3]  # the case of test_ssc_eviction: 24 checkpoints, 3 never read
    params = dataclasses.replace(GREEDY, max_tokens=80)
    roomy = make_engine(ssc_k1, tokenizer, max_model_len=1024)
    weights = Recorder(roomy)
    baseline = tokens(generate(roomy, [prompt], params))[0]
    never = {s for s in range(24) if weights.segment_weights(8).get(s, 0.0) == 0.0}
    tight = make_engine(ssc_k1, tokenizer, max_model_len=1024, num_checkpoint_blocks=(120 + 80 - 1) // 8 - 1,
                        num_host_blocks=1, runner=CUDA)
    rec = Recorder(tight)
    assert tokens(generate(tight, [prompt], params))[0] == baseline
    assert tight.counters["offload"] == 1 and tight.counters["preempt"] == 0
    holes = {e.segment for plan, _ in rec.steps for e in plan.table_updates if e.block < 0}
    assert holes and holes <= never, (holes, never)
    turn2 = (prompt + baseline)[:160] + random_prompts(1, [5])[0]
    short = dataclasses.replace(params, max_tokens=16)
    warm = tokens(generate(tight, [turn2], short))[0]
    assert warm == tokens(generate(make_engine(ssc_k1, tokenizer, max_model_len=1024), [turn2], short))[0]
    tight.scheduler.check()


def _relative(plan, base: int) -> tuple:
    """What a plan decided, with seq ids counted from `base`."""
    def rows(xs):
        return tuple(dataclasses.replace(x, seq_id=x.seq_id - base) for x in xs)

    return (rows(plan.decode), rows(plan.prefill), plan.offloads, plan.onloads, tuple(s - base for s in plan.preempted),
            tuple(s - base for s in plan.released), rows(plan.table_appends), rows(plan.table_updates))


def _credit_at_once(engine) -> None:
    """The cache as it was before `PendingWeights`: every block's weight of a hand-over credited at once."""
    cache = engine.scheduler.cache
    cache.add_block_weights = lambda w: cache.add_weights({b: x for b, x in enumerate(w.tolist()) if x > 0})


@pytest.mark.parametrize(("seqs", "blocks"), [(3, 30), (2, 26)])
def test_pending_weights_leave_the_engine_unchanged(ssc_k1, tokenizer, seqs: int, blocks: int) -> None:
    """Real router weights under pressure: 3 requests sharing a prefix in a pool too small for them,
    then second turns that reuse and evict what the first left. Held blocks' weights kept pending
    (`cache/pending.py`) must give the same plans (evictions, offloads, onloads, preemptions), the
    same counters and the same tokens as crediting each hand-over at once."""
    shared = random_prompts(2, [48])[0]
    prompts = [shared + p for p in random_prompts(3, [30, 52, 17])]
    params = dataclasses.replace(GREEDY, max_tokens=40)
    runs = []
    for old in (True, False):
        engine = make_engine(ssc_k1, tokenizer, max_model_len=256, max_num_seqs=seqs, num_checkpoint_blocks=blocks,
                             num_host_blocks=3, utility_decay=0.9, runner=CUDA)
        if old:
            _credit_at_once(engine)
        rec = Recorder(engine)
        first = tokens(generate(engine, prompts, params))
        turn2 = [p + w[:9] + [5, 6] for p, w in zip(prompts, first, strict=True)]
        second = tokens(generate(engine, turn2, params))
        engine.scheduler.check()
        base = min(s.seq_id for p, _ in rec.steps for s in p.prefill)  # seq ids count on across engines
        runs.append((first, second, [_relative(p, base) for p, _ in rec.steps], dict(engine.counters)))
    assert runs[0] == runs[1]
    counters = runs[1][3]
    assert min(counters["evict_idle"], counters["offload"], counters["prefix_hit_tokens"]) > 0, counters
