"""SSC eviction: under pressure the engine drops or offloads the checkpoints the router has not
selected; when those were never selected in an unconstrained run, the output is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import GREEDY, Recorder, generate, make_engine, random_prompts, tokens

C = 8
PROMPT_LEN, MAX_TOKENS = 120, 80
NUM_SEGMENTS = (PROMPT_LEN + MAX_TOKENS - 1) // C  # checkpoints one run writes (24)


@pytest.fixture(scope="module")
def ssc_k1(model_dir):
    # Many short segments and one pick per head: most checkpoints are read, a few never are.
    return load_model(model_dir, dtype=torch.float32, device="cpu", segment_size=C, top_k=1)


@pytest.mark.parametrize("host_blocks", [0, 1], ids=["drop", "offload"])
def test_evicting_unselected_checkpoint_keeps_output(ssc_k1, tokenizer, host_blocks: int) -> None:
    prompt = random_prompts(0, [PROMPT_LEN] * 4)[3]
    params = dataclasses.replace(GREEDY, max_tokens=MAX_TOKENS)
    roomy = make_engine(ssc_k1, tokenizer, max_model_len=1024)
    rec = Recorder(roomy)
    baseline = tokens(generate(roomy, [prompt], params))[0]
    weights = rec.segment_weights(C)
    never = {s for s in range(NUM_SEGMENTS) if weights.get(s, 0.0) == 0.0}
    assert 0 < len(never) < NUM_SEGMENTS // 4, never

    # One block short of the run's needs: the running sequence must give one checkpoint up.
    tight = make_engine(ssc_k1, tokenizer, max_model_len=1024, num_checkpoint_blocks=NUM_SEGMENTS - 1,
                        num_host_blocks=host_blocks)
    rec = Recorder(tight)
    assert tokens(generate(tight, [prompt], params))[0] == baseline
    holes = rec.holes()
    assert holes and holes <= never, (holes, never)  # the policy gave up a never-selected checkpoint
    moved = tight.counters["offload"] if host_blocks else tight.counters["drop_running"]
    assert moved == 1 and tight.counters["preempt"] == 0
    tight.scheduler.check()

    if host_blocks:
        # A request sharing the first 160 tokens attaches the offloaded checkpoint (segment < 20) again:
        # it is copied back (onload) into the block of an idle checkpoint beyond the shared prefix.
        assert max(holes) < 20
        turn2 = (prompt + baseline)[:160] + random_prompts(1, [5])[0]
        short = dataclasses.replace(params, max_tokens=16)  # 181 tokens: fits the pool, no more evictions
        warm = tokens(generate(tight, [turn2], short))[0]
        assert tight.counters["onload"] == 1 and tight.counters["evict_idle"] >= 1
        assert tight.counters["offload"] == 1 and tight.counters["drop_running"] == 0
        assert tight.counters["prefix_hit_tokens"] == 160
        assert warm == tokens(generate(make_engine(ssc_k1, tokenizer, max_model_len=1024), [turn2], short))[0]
        tight.scheduler.check()
