"""Start-up: arguments, pool sizing from memory budgets, loading an engine from a model directory."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mcserve.server.engine.args import EngineArgs, engine_config, size_pools
from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.errors import ConfigError
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots

CPU = torch.device("cpu")


def sizes(model, **kw):
    return size_pools(EngineArgs(**kw), model.cfg, CPU, torch.float32, torch.float32)


def test_budgets_become_pool_sizes(model) -> None:
    bps = StateSlots.bytes_per_slot(model.cfg, torch.float32)
    bpb = CheckpointBlocks.bytes_per_block(model.cfg, torch.float32, torch.float32)
    p = sizes(model, max_num_seqs=4, state_memory=10 * bps, checkpoint_memory=100 * bpb + 5)
    assert (p.num_state_slots, p.num_checkpoint_blocks, p.num_host_blocks) == (10, 100, 0)
    # state_memory alone covers both: 2 * max_num_seqs slots, the rest for checkpoints
    p = sizes(model, max_num_seqs=4, state_memory=8 * bps + 50 * bpb, host_checkpoint_memory=7 * bpb)
    assert (p.num_state_slots, p.num_checkpoint_blocks, p.num_host_blocks) == (8, 50, 7)
    p = sizes(model, max_num_seqs=4)  # defaults
    assert p.num_state_slots == 8 and p.num_checkpoint_blocks * bpb <= 256 * 2**20
    cfg = engine_config(EngineArgs(max_num_seqs=4), model.cfg, p)
    assert cfg.segment_size == 16 and cfg.evict_running_checkpoints  # ssc tolerates holes


def test_too_small_budgets_refuse_at_start(model) -> None:
    bps = StateSlots.bytes_per_slot(model.cfg, torch.float32)
    with pytest.raises(ConfigError, match="max_num_seqs=64"):
        sizes(model, max_num_seqs=64, state_memory=10 * bps, checkpoint_memory=1 << 20)
    with pytest.raises(ConfigError, match="max_num_seqs=64"):
        sizes(model, max_num_seqs=64, state_memory=10 * bps)
    with pytest.raises(ConfigError, match="fewer than the 4 required"):
        sizes(model, max_num_seqs=4, checkpoint_memory=1000)


@pytest.mark.parametrize("kw", [dict(max_num_seqs=0), dict(state_memory=1.5), dict(state_memory=-3),
                                dict(mc_aggregation="mean"), dict(mc_top_k=0), dict(served_model_name=" ")])
def test_bad_args(kw) -> None:
    with pytest.raises(ConfigError):
        EngineArgs(**kw)


def test_from_model_dir(model_dir) -> None:
    llm = LLM(model_dir, device="cpu", max_num_seqs=4, max_model_len=256, checkpoint_memory=2 << 20,
              mc_aggregation="grm", served_model_name="tiny")
    engine = llm.engine
    assert engine.model_name == "tiny" and engine.model.spec.aggregation == "grm"
    assert not engine.config.evict_running_checkpoints  # grm reads every checkpoint
    assert engine.runner.pools.ckpts.ssm.dtype == torch.float32  # "auto" on CPU: exact resume
    out = llm.generate(["Hello there", [5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]
    assert out[0].prompt_token_ids == llm.tokenizer.encode("Hello there")


@pytest.mark.parametrize(("kw", "mode"), [(dict(), "serial"), (dict(runner="cuda"), "serial"),
                                          (dict(runner="cuda", async_scheduling=True), "async"),
                                          (dict(runner="cuda", async_scheduling=False), "serial")])
def test_start_up_log_says_which_scheduling_runs(model_dir, caplog, kw, mode: str) -> None:
    """On CPU auto is serial, the CUDA runner's code included; the engine's start-up line says so."""
    with caplog.at_level("INFO", logger="mcserve.server.engine.llm_engine"):
        llm = LLM(model_dir, device="cpu", max_num_seqs=2, max_model_len=128, checkpoint_memory=1 << 20, **kw)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine for ")]
    assert f"{mode} scheduling" in line and (llm.engine.pipeline is not None) == (mode == "async")


def test_async_from_model_dir(model_dir) -> None:
    engine = AsyncEngine.from_model_dir(model_dir, device="cpu", max_num_seqs=2, max_model_len=128,
                                        checkpoint_memory=1 << 20, mc_top_k=1)
    try:
        assert engine.is_ready and engine.model_name == model_dir.name and engine.max_model_len == 128
        assert engine.engine.model.spec.top_k == 1

        async def main():
            return [d async for d in engine.generate(GenerateRequest("x", (5, 6), SamplingParams(max_tokens=3)))]

        deltas = asyncio.run(main())
        assert deltas[-1].usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
        assert engine.stats().state_slots_total == 4
    finally:
        engine.shutdown()
