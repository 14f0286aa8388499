"""Prompt logprobs from the prefill's all-position logits equal the token-by-token reference, however
the prompt is chunked, and are not skipped by a cached prefix."""

from __future__ import annotations

import torch

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.sampling_params import SamplingParams
from tests.server.engine.helpers import make_engine, random_prompts


def _run(engine, rid: str, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(GenerateRequest(rid, tuple(prompt), params))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    return [d for d in deltas if d.request_id == rid]


def test_prompt_logprobs_match_the_reference_across_chunks_and_a_cached_prefix(model, tokenizer) -> None:
    (prompt,) = random_prompts(40, [53])  # four chunks of 16 (one segment each) under a 16-token budget
    engine = make_engine(model, tokenizer, max_num_batched_tokens=16)
    _run(engine, "warm", prompt, SamplingParams(temperature=0.0, max_tokens=1))  # caches the prefix
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, n=2, seed=1)
    before = engine.counters["prefill_tokens"]
    deltas = _run(engine, "scored", prompt, params)
    assert engine.counters["prefill_tokens"] - before == 2 * len(prompt), "both choices computed every position"
    ref = torch.log_softmax(model.forward_reference(prompt).double(), dim=-1)  # [T, V]
    for index in (0, 1):
        (first,) = [d for d in deltas if d.index == index and d.prompt_logprobs is not None]
        scored = first.prompt_logprobs
        assert first.token_ids and len(scored) == len(prompt) and scored[0] is None
        for pos in range(1, len(prompt)):
            e, row = scored[pos], ref[pos - 1]
            assert e.token_id == prompt[pos]
            assert abs(e.logprob - row[prompt[pos]].item()) < 1e-4
            assert e.rank == int((row > row[prompt[pos]]).sum()) + 1
            assert [t for t, _, _ in e.top] == row.topk(3).indices.tolist()
    assert sum(d.prompt_logprobs is not None for d in deltas) == 2  # once per choice
