"""Regression tests for issue 9 items 1-5, each reproduced on the tiny random SSC model (CPU, fp32
checkpoints): the cache never serves a state a cold run would not compute, never leaks a prefix
across tenants, never stalls admission, and credits every router read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import GREEDY, Recorder, generate, make_engine, random_prompts, tokens


def _run(engine, prompt, params) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (which show a different state even when the argmax agrees)."""
    out = generate(engine, [prompt], dataclasses.replace(params, logprobs=0))[0].outputs[0]
    return out.token_ids, [lp.logprob for lp in out.logprobs]


def _same(got: tuple[list[int], list[float]], want: tuple[list[int], list[float]]) -> bool:
    return got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-4)


def test_item1_request_top_k_does_not_share_states(model, tokenizer) -> None:
    """Every layer after the first reads MC memories, so the state depends on SSC's k: a k=1 request
    and a default-k one must not resume from each other's checkpoints."""
    (p,) = random_prompts(20, [200])
    k1 = dataclasses.replace(GREEDY, mc_top_k=1)
    cold = make_engine(model, tokenizer, enable_prefix_caching=False)
    cold_default, cold_k1 = _run(cold, p, GREEDY), _run(cold, p, k1)
    assert not _same(cold_default, cold_k1)  # k changes this prompt's output: the test can fail
    engine = make_engine(model, tokenizer)
    assert _same(_run(engine, p, k1), cold_k1)
    assert _same(_run(engine, p, GREEDY), cold_default)
    assert _same(_run(engine, p, k1), cold_k1)
    assert engine.counters["prefix_hit_tokens"] == 192  # the third request reused the first's prefix


def _checkpoint(engine, c) -> torch.Tensor:
    pools = engine.runner.pools
    return pools.ckpts.ssm[c.gpu] if c.gpu is not None else pools.host.ssm[c.host]


def test_item2_states_computed_around_a_hole_are_never_indexed(model_dir, tokenizer) -> None:
    """12 GPU blocks for a 340-token run at segment 8: the sequence offloads its own checkpoints and
    reads around them. Every checkpoint left in the index must equal the one a cold run of the same
    tokens writes."""
    C = 8
    m = load_model(model_dir, dtype=torch.float32, device="cpu", segment_size=C)
    (p,) = random_prompts(21, [300])
    tight = make_engine(m, tokenizer, num_checkpoint_blocks=12, num_host_blocks=128)
    seqs = []
    add = tight.scheduler.add_request
    tight.scheduler.add_request = lambda seq: (seqs.append(seq), add(seq))[1]
    generate(tight, [p], dataclasses.replace(GREEDY, max_tokens=40))
    assert tight.counters["offload"] > 0  # it did read around holes
    (seq,) = seqs
    hashes = seq.prefix_hashes(C)
    indexed = tight.scheduler.cache.match(hashes, len(hashes) - 1)
    assert indexed  # the exact prefix before the first hole stays reusable

    cold = make_engine(m, tokenizer, enable_prefix_caching=False)
    rec = Recorder(cold)
    generate(cold, [seq.token_ids[:-1]], dataclasses.replace(GREEDY, max_tokens=1))
    written = {c.start_pos // C + j: b for plan, _ in rec.steps for c in plan.prefill
               for j, b in enumerate(c.write_blocks)}
    errors = []
    for i, c in enumerate(indexed):
        want = cold.runner.pools.ckpts.ssm[written[i]]
        errors.append(float((_checkpoint(tight, c) - want).norm() / want.norm()))
    assert max(errors) < 1e-4, [f"{i}: {e:.2g}" for i, e in enumerate(errors) if e >= 1e-4]


def test_item3_prefix_hits_cannot_stall_admission(model, tokenizer) -> None:
    """An 8-block pool: the first request leaves 8 idle checkpoints; the second attaches all of them
    and then needs a ninth block. It must be served (a cold copy of it would be)."""
    p, extra = random_prompts(22, [138, 10])
    engine = make_engine(model, tokenizer, num_checkpoint_blocks=8)
    generate(engine, [p], dataclasses.replace(GREEDY, max_tokens=4))  # 141 tokens computed: 8 checkpoints
    assert engine.scheduler.cache.num_cached_blocks == 8
    out = generate(engine, [p + extra])[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert len(tokens(generate(engine, [p + extra]))[0]) == GREEDY.max_tokens  # and the engine lives on
    engine.scheduler.check()


def _cached_tokens(engine, prompt, **fields) -> int:
    rid = f"r{engine.counters['requests']}"
    engine.add_request(GenerateRequest(rid, tuple(prompt), GREEDY, **fields))
    usage = None
    while engine.has_unfinished():
        usage = next((d.usage for d in engine.step() if d.usage is not None), usage)
    return usage.cached_tokens


def test_item4_tenants_do_not_learn_each_others_prefixes(model, tokenizer) -> None:
    (p,) = random_prompts(23, [70])
    engine = make_engine(model, tokenizer, enable_snapshots=False)
    assert _cached_tokens(engine, p, api_key="key-a") == 0
    assert _cached_tokens(engine, p, api_key="key-b") == 0
    assert _cached_tokens(engine, p) == 0  # no key is a tenant of its own
    assert _cached_tokens(engine, p, api_key="key-a") == 64


@pytest.mark.parametrize("chunk", [128, 48])
def test_item5_reads_inside_the_writing_chunk_are_credited(model, tokenizer, chunk: int) -> None:
    """The router weight each checkpoint receives must not depend on how the prompt was chunked:
    one segment per chunk reads every earlier checkpoint from the pool; bigger chunks read the
    ones they wrote themselves, and those reads must be credited too."""
    (p,) = random_prompts(24, [100])
    C = model.spec.segment_size
    one_token = dataclasses.replace(GREEDY, max_tokens=1)  # prefill only
    weights = {}
    for budget in (C, chunk):
        engine = make_engine(model, tokenizer, max_num_batched_tokens=budget)
        rec = Recorder(engine)
        generate(engine, [p], one_token)
        weights[budget] = rec.segment_weights(C)
    assert sorted(weights[C]) == list(range(100 // C))
    assert weights[chunk].keys() == weights[C].keys()
    for s, w in weights[C].items():
        assert weights[chunk][s] == pytest.approx(w, rel=1e-4), s


def test_item5_newest_checkpoint_is_not_the_first_victim(model, tokenizer) -> None:
    """A prefill in chunks of 4 segments with room for 6 checkpoints, nothing offloadable: the
    sequence must drop its own checkpoints. The last one a chunk wrote has not been read yet (the
    next chunk reads it first), so it must not be what goes."""
    (p,) = random_prompts(25, [200])
    C = model.spec.segment_size
    engine = make_engine(model, tokenizer, max_num_batched_tokens=4 * C, num_checkpoint_blocks=6)
    rec = Recorder(engine)
    generate(engine, [p], dataclasses.replace(GREEDY, max_tokens=1))
    assert engine.counters["drop_running"] > 0
    newest = None
    for plan, _ in rec.steps:
        (chunk,) = plan.prefill
        holes = {i for i, b in enumerate(chunk.read_blocks) if b < 0}
        assert newest not in holes, (newest, holes)
        newest = chunk.end_pos // C - 1
