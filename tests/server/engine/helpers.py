"""Engines on the tiny random model, and drivers that collect what they produce."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm import LLM, RequestOutput
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.plan import StepPlan
from mcserve.server.engine.runner.base import RunnerOutput
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

# ignore_eos: a random model may hit eos at any point; most tests want full-length outputs.
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_engine(model: MCGatedDeltaNetForCausalLM, tokenizer: Tokenizer, **overrides) -> LLMEngine:
    """A small engine with fp32 checkpoints (exact resume on CPU) and NaN-poisoned pools, so that
    reading a slot or block that was never written shows up in the outputs. overrides: EngineConfig
    fields, and `runner` (RunnerOptions)."""
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, segment_size=model.spec.segment_size,
               num_state_slots=16, num_checkpoint_blocks=256)
    runner = overrides.pop("runner", None)
    cfg.update(overrides)
    engine = LLMEngine(model, tokenizer, EngineConfig(**cfg), ckpt_dtype=torch.float32, seed=0, runner=runner)
    r = engine.runner.pools
    for t in (r.states.ssm, r.states.key_sum, r.states.conv, r.ckpts.ssm, r.ckpts.key, r.ckpts.conv):
        t.fill_(float("nan"))
    return engine


class Recorder:
    """Keeps every (plan, output) the engine's runner executes."""

    def __init__(self, engine: LLMEngine) -> None:
        self.steps: list[tuple[StepPlan, RunnerOutput]] = []
        inner = engine.runner.execute

        def execute(plan, sampling):
            out = inner(plan, sampling)
            self.steps.append((plan, out))
            return out

        engine.runner.execute = execute

    def segment_weights(self, segment_size: int) -> dict[int, float]:
        """Router weight per segment of a single-sequence run (blocks mapped back to segments)."""
        seg_of: dict[int, int] = {}
        weights: dict[int, float] = {}
        for plan, out in self.steps:
            for c in plan.prefill:
                for j, b in enumerate(c.write_blocks):
                    seg_of[b] = c.start_pos // segment_size + j
            for r in plan.decode:
                if r.write_block >= 0:
                    seg_of[r.write_block] = r.position // segment_size
            for b, w in out.step.block_weights.items():
                weights[seg_of[b]] = weights.get(seg_of[b], 0.0) + w
        return weights

    def holes(self) -> set[int]:
        """Segments some row read as -1 (dropped or offloaded at the time)."""
        out: set[int] = set()
        for plan, _ in self.steps:
            for r in plan.decode:
                out |= {i for i, b in enumerate(r.block_table) if b < 0}
            for c in plan.prefill:
                out |= {i for i, b in enumerate(c.read_blocks) if b < 0}
        return out


def generate(engine: LLMEngine, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[RequestOutput]:
    return LLM.from_engine(engine).generate([list(p) for p in prompts], params)


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def random_prompts(seed: int, lengths: Sequence[int], vocab: int = 500) -> list[list[int]]:
    """Token ids in [3, vocab): clear of the tokenizer's special tokens (0..2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
