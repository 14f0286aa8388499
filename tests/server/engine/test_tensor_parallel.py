"""Tensor parallelism on CPU (gloo): an engine whose model is sharded over two processes produces the
greedy tokens and the logits (within 1e-5) of the one-process engine, step for step, for ssc, grm and
none, through prefix reuse and preemption (server/engine/tp/, server/model/sharding.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm import LLM
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.tp.launcher import launch
from mcserve.server.engine.tp.step_message import Setup
from mcserve.server.errors import ConfigError, EngineDeadError
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_model
from mcserve.server.text.tokenizer import Tokenizer
from tests.server.engine.helpers import GREEDY, random_prompts, tokens

# Tiny pools: 8 blocks hold one whole sequence (max_model_len 128 / C 16) and no running
# sequence's checkpoint may be evicted, so five sequences preempt each other; what they leave
# cached is then reused by the shared-prefix pair.
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, segment_size=16,
                      num_state_slots=6, num_checkpoint_blocks=8, evict_running_checkpoints=False)


class LogitsLog:
    """Stands in for a runner's sampler and keeps the logits of every call (one per step)."""

    def __init__(self, sampler) -> None:
        self.inner = sampler
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, logits: torch.Tensor, *args, **kwargs):
        self.calls.append(logits.clone())
        return self.inner(logits, *args, **kwargs)


def _drive(engine: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
    """Tokens, logits of every step, checkpoint reads per layer."""
    engine.runner.sampler = log = LogitsLog(engine.runner.sampler)
    llm = LLM.from_engine(engine)
    params = dataclasses.replace(GREEDY, max_tokens=16)
    out = tokens(llm.generate(random_prompts(4, [40, 33, 60, 20, 41]), params))
    assert engine.counters["preempt"] > 0
    system, a, b = random_prompts(3, [40, 7, 9])
    for p in (system + a, system + b):
        out += tokens(llm.generate([p], GREEDY))
    assert engine.counters["prefix_hit_tokens"] >= 32  # two whole segments of the system prompt
    engine.scheduler.check()
    return out, log.calls, engine.runner.take_selections()


@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two q/k heads each feeding two v-heads: a rank holds a head and its group."""
    path = tmp_path_factory.mktemp("tp") / "grouped"
    init_model(path, preset="tiny", mc={"aggregation": "ssc", "segment_size": 16, "top_k": 2, "router": "learned"},
               seed=4, num_v_heads=4)
    return path


@pytest.mark.parametrize("aggregation,grouped", [("ssc", False), ("grm", False), ("none", False), ("ssc", True)],
                         ids=["ssc", "grm", "none", "ssc-grouped-v-heads"])
def test_two_ranks_match_one(model_dir: Path, grouped_dir: Path, tokenizer: Tokenizer, aggregation: str,
                             grouped: bool) -> None:
    """The checkpoint is ssc with a learned router; `--mc-aggregation` serves it as grm or none."""
    mc = {"aggregation": aggregation}
    model_dir = grouped_dir if grouped else model_dir
    one = LLMEngine(load_model(model_dir, dtype=torch.float32, **mc), tokenizer, CONFIG, ckpt_dtype=torch.float32,
                    seed=0)
    want, want_logits, want_reads = _drive(one)

    workers, model = launch(model_dir, 2, torch.device("cpu"), torch.float32, mc, threads=1, timeout_s=60.0)
    try:
        workers.start_serving(Setup(CONFIG.num_state_slots, CONFIG.num_checkpoint_blocks, 0, torch.float32))
        two = LLMEngine(model, tokenizer, CONFIG, ckpt_dtype=torch.float32, seed=0, tensor_parallel=workers)
        got, got_logits, got_reads = _drive(two)
        assert two.counters == one.counters  # same plans: same preemptions, same prefix hits
    finally:
        workers.stop()
    assert got == want
    assert got_reads == want_reads  # counted once per (row, checkpoint), not once per rank
    assert len(got_logits) == len(want_logits)
    for g, w in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_serve_path_with_tensor_parallel_size(model_dir: Path) -> None:
    """`--tensor-parallel-size 2` through EngineArgs: pools sized per device, the same tokens."""
    path = model_dir
    prompts = random_prompts(5, [37, 12])
    args = dict(device="cpu", dtype="float32", threads=1, checkpoint_memory=1 << 20, max_num_seqs=4)
    one = LLM(path, **args)
    want = tokens(one.generate(prompts, GREEDY))
    llm = LLM(path, tensor_parallel_size=2, **args)
    try:
        # each rank holds half of every block, so the same per-device budget holds twice the blocks
        blocks = one.engine.scheduler.config.num_checkpoint_blocks
        assert llm.engine.scheduler.config.num_checkpoint_blocks in (2 * blocks, 2 * blocks + 1)
        assert tokens(llm.generate(prompts, GREEDY)) == want
    finally:
        llm.engine.close()
    assert not any(p.is_alive() for p in llm.engine.runner.workers._procs)


def test_heads_not_divisible_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    init_model(path, preset="tiny", seed=0)  # 2 heads
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide num_heads=2"):
        launch(path, 3, torch.device("cpu"), torch.float32, {}, threads=1, timeout_s=60.0)


def test_a_dead_worker_fails_the_step_not_the_wait(model_dir: Path, tokenizer: Tokenizer) -> None:
    """A rank that dies makes the next step raise EngineDeadError at once (no hang in a collective)."""
    workers, model = launch(model_dir, 2, torch.device("cpu"), torch.float32, {}, threads=1, timeout_s=60.0)
    try:
        workers.start_serving(Setup(CONFIG.num_state_slots, CONFIG.num_checkpoint_blocks, 0, torch.float32))
        engine = LLMEngine(model, tokenizer, CONFIG, ckpt_dtype=torch.float32, seed=0, tensor_parallel=workers)
        llm = LLM.from_engine(engine)
        assert tokens(llm.generate(random_prompts(6, [20]), GREEDY))
        workers._procs[0].kill()
        workers._procs[0].join(10)
        t = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel"):
            llm.generate(random_prompts(7, [20]), GREEDY)
        assert time.monotonic() - t < 30
    finally:
        workers.stop()
