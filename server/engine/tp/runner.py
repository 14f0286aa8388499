"""`TPModelRunner`: the engine's runner on rank 0 of a tensor-parallel group.

The scheduler runs once, here. Each step: the plan and SSC's per-sequence k go to every worker
(`TPWorkers.send`), every rank runs the same forward on its shard (executor.py), the router weights
and checkpoint-read counts are summed onto rank 0, and rank 0 alone computes logits (it holds the
lm_head), prompt logprobs and samples, with the torch runner's semantics.

Failure: every rank runs the same collectives, so a stage cannot fail for some sequences and go on
without the others (the single-device runners' per-stage recovery would desynchronise the ranks).
Any failure of the forward - a worker that exits, a collective that times out or errors - raises
EngineDeadError: the engine reports dead (/health) and fails what is in flight; no step hangs longer
than the collective timeout. Sampling is rank 0's alone, so a sampling failure fails only the rows
it concerns (`RunnerOutput.failed`), as on one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mcserve.server.engine.plan import StepOutput, StepPlan
from mcserve.server.engine.runner.base import (
    ModelRunner,
    RunnerOutput,
    prefill_modes,
    request_top_k,
    sample_rows,
    split_prefill_logits,
)
from mcserve.server.engine.runner.prompt_logprobs import PromptLogprob
from mcserve.server.engine.sampler import Sampler, SamplingRow
from mcserve.server.engine.tp.executor import ShardExecutor
from mcserve.server.engine.tp.launcher import TPWorkers
from mcserve.server.engine.tp.step_message import StepMessage
from mcserve.server.errors import EngineDeadError
from mcserve.server.model.sharding import ShardedMCGatedDeltaNet

if TYPE_CHECKING:  # masks.py imports llguidance, which may be missing (structured/grammars.py)
    from mcserve.server.engine.structured.masks import TokenMasks


class TPModelRunner(ModelRunner):
    def __init__(self, model: ShardedMCGatedDeltaNet, workers: TPWorkers, seed: int | None = None,
                 vocab_size: int | None = None, masks: TokenMasks | None = None) -> None:
        assert model.shard.rank == 0 and workers.setup is not None
        self.model, self.workers, self.masks = model, workers, masks
        self.spec = model.spec
        self.device = model.device
        self.executor = ShardExecutor(model, workers.group, workers.setup)
        self.pools = self.executor.pools
        self.selections = torch.zeros(model.cfg.num_hidden_layers, dtype=torch.long, device=self.device)
        self.sampler = Sampler(vocab_size or model.cfg.vocab_size, self.device, seed=seed)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> RunnerOutput:
        msg = StepMessage(plan, tuple(request_top_k(self.spec, sampling, c.seq_id) for c in plan.prefill),
                          tuple(request_top_k(self.spec, sampling, r.seq_id) for r in plan.decode))
        modes = prefill_modes(sampling, plan.prefill)
        try:
            self.workers.send(msg)
            out, weights, reads = self.executor.forward(msg, modes)
            block_weights = weights.per_block()  # device -> host: every rank's part of the step is done
        except Exception as e:
            raise EngineDeadError(f"tensor-parallel step {plan.step} failed: {self.workers.describe_failure(e)}"
                                  "; restart the server") from e
        if reads is not None:
            self.selections += reads
        prompt_lps: dict[int, tuple[int, list[PromptLogprob]]] = {}
        logits = split_prefill_logits(plan.prefill, out.prefill, modes, sampling, self.sampler.vocab_size, prompt_lps)
        row_ids = [c.seq_id for c in plan.prefill if c.sample]
        if out.decode is not None:
            logits.append(out.decode)
            row_ids += [r.seq_id for r in plan.decode]
        failed: dict[int, Exception] = {}
        token_ids, logprobs = {}, {}
        try:
            token_ids, logprobs = sample_rows(self.sampler, self.masks, logits, row_ids, sampling)
        except Exception as e:  # reported: rank 0's own work, after every rank finished the step
            failed.update((s, e) for s in row_ids)
            for seq_id in row_ids:
                prompt_lps.pop(seq_id, None)
        return RunnerOutput(StepOutput(token_ids, block_weights), logprobs, prompt_lps, failed)

    def take_selections(self) -> list[int]:
        counts = self.selections.tolist()
        self.selections.zero_()
        return counts

    def close(self) -> None:
        self.workers.stop()


