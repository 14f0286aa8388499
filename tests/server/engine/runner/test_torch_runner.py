"""The torch runner on its own: block transfers, per-request SSC k, router weights per block."""

from __future__ import annotations

import dataclasses

import torch

from mcserve.server.engine.plan import BlockCopy, StepPlan
from mcserve.server.engine.runner.torch_runner import TorchModelRunner
from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import GREEDY, generate, make_engine, random_prompts, tokens


def test_offload_then_onload_round_trips_blocks(model) -> None:
    runner = TorchModelRunner(model, num_state_slots=2, num_checkpoint_blocks=4, num_host_blocks=3)
    g = torch.Generator().manual_seed(0)
    for name in ("ssm", "key", "conv"):
        t = getattr(runner.pools.ckpts, name)
        t.copy_(torch.randn(t.shape, generator=g))
    before = {name: getattr(runner.pools.ckpts, name).clone() for name in ("ssm", "key", "conv")}
    # Block 1 goes to host block 2 while host block 0 (filled by the first step) comes back into block 1.
    runner.execute(StepPlan(1, offloads=(BlockCopy(3, 0),)), {})
    runner.execute(StepPlan(2, offloads=(BlockCopy(1, 2),), onloads=(BlockCopy(0, 1),)), {})
    runner.execute(StepPlan(3, onloads=(BlockCopy(2, 0),)), {})
    for name, old in before.items():
        new = getattr(runner.pools.ckpts, name)
        assert torch.equal(new[1], old[3]) and torch.equal(new[0], old[1]), name
        assert torch.equal(new[2:], old[2:]), name  # untouched


def test_request_mc_top_k_lowers_ssc_k(model_dir, model, tokenizer) -> None:
    assert model.spec.top_k == 2
    top1 = load_model(model_dir, dtype=torch.float32, device="cpu", top_k=1)
    prompts = random_prompts(20, [70, 45])
    params = dataclasses.replace(GREEDY, max_tokens=30)
    want = tokens(generate(make_engine(top1, tokenizer), prompts, params))
    lowered = dataclasses.replace(params, mc_top_k=1)
    assert tokens(generate(make_engine(model, tokenizer), prompts, [lowered, lowered])) == want
    assert tokens(generate(make_engine(model, tokenizer), prompts, params)) != want  # k matters here
    mixed = tokens(generate(make_engine(model, tokenizer), prompts, [lowered, params]))
    assert mixed[0] == want[0]  # per row: the other row keeps the model's k


def test_block_weights_cover_the_blocks_read(model, tokenizer) -> None:
    """Blocks read, including those a prefill chunk wrote and its later tokens read (issue 9 item 5)."""
    engine = make_engine(model, tokenizer)
    seen = []
    inner = engine.runner.execute

    def execute(plan, sampling):
        out = inner(plan, sampling)
        seen.append((plan, out.step.block_weights))
        return out

    engine.runner.execute = execute
    generate(engine, random_prompts(21, [50, 20]), dataclasses.replace(GREEDY, max_tokens=20))
    assert any(w for _, w in seen)
    L, H = model.cfg.num_hidden_layers, model.cfg.num_heads
    for plan, w in seen:
        read = {b for r in plan.decode for b in r.block_table} | {b for c in plan.prefill
                                                                  for b in c.read_blocks + c.write_blocks}
        assert set(w) <= read - {-1} and all(v > 0 for v in w.values())
        # per token and head, the gammas of online + cached memories sum to 1
        assert sum(w.values()) < plan.num_tokens * L * H
    assert any(set(w) & {b for c in plan.prefill for b in c.write_blocks} for plan, w in seen)
