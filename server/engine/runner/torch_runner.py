"""The torch runner: executes a plan with the model's torch paths, on CPU or on one GPU.

Stages run in plan.py's order: block copies and slot resets/restores (`DevicePools`), every
prefill chunk in one packed pass (`model.prefill_batch`: torch rounds on CPU, fla + Triton on CUDA,
picked once here by `select_kernels`), one batched decode (`model.decode`), then one sampler call over
the logits of every row that samples. A stage that fails reports the sequences it ran in
`RunnerOutput.failed` (base.py) and the later stages run without them.

Host/device traffic per step: the prefill's token ids and packed layout go over in a few pinned,
non-blocking copies; the decode metadata in one (`pack_decode`); the sampler adds its
own small copies (per-row parameters, only for the stages some row needs) and brings the tokens
(and logprobs) back in one transfer; the router weights come back in one more, only for
aggregations that read checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mcserve.kernels.prefill.batched import select_kernels
from mcserve.server.engine.plan import PrefillChunk, StepOutput, StepPlan
from mcserve.server.engine.runner.base import (
    ModelRunner,
    RunnerOutput,
    prefill_inputs,
    prefill_modes,
    request_top_k,
    sample_rows,
    split_prefill_logits,
)
from mcserve.server.engine.runner.decode_batch import pack_decode
from mcserve.server.engine.runner.pools import DevicePools
from mcserve.server.engine.runner.prompt_logprobs import PromptLogprob
from mcserve.server.engine.runner.router_weights import BlockWeights
from mcserve.server.engine.sampler import Sampler, SamplingRow
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

if TYPE_CHECKING:  # masks.py imports llguidance, which may be missing (structured/grammars.py)
    from mcserve.server.engine.structured.masks import TokenMasks


class TorchModelRunner(ModelRunner):
    def __init__(self, model: MCGatedDeltaNetForCausalLM, num_state_slots: int, num_checkpoint_blocks: int,
                 num_host_blocks: int = 0, ckpt_dtype: torch.dtype | None = None, seed: int | None = None,
                 vocab_size: int | None = None, masks: TokenMasks | None = None) -> None:
        """`masks`: the guided sequences' grammar masks, gathered after the forward, just before
        sampling (their computation overlaps the forward, see structured/masks.py)."""
        self.model = model
        self.masks = masks
        self.device = model.device
        self.spec = model.spec
        self.pools = DevicePools(model, num_state_slots, num_checkpoint_blocks, num_host_blocks, ckpt_dtype)
        # (sequence, checkpoint) reads per layer since the last `take_selections`; stays on the device
        self.selections = torch.zeros(model.cfg.num_hidden_layers, dtype=torch.long, device=self.device)
        # vocab_size: what may be sampled (a tokenizer smaller than a padded lm_head)
        self.sampler = Sampler(vocab_size or model.cfg.vocab_size, self.device, seed=seed)
        self.prefill_kernels = select_kernels(self.device, self.spec, model.dtype)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> RunnerOutput:
        self.pools.copy(plan)
        failed: dict[int, Exception] = {}
        bad_slots = self.pools.prepare_slots(plan)
        weights = BlockWeights()
        logits: list[torch.Tensor] = []
        row_ids: list[int] = []  # seq id of each logits row
        prompt_lps: dict[int, tuple[int, list[PromptLogprob]]] = {}
        chunks = [c for c in plan.prefill if c.slot not in bad_slots]
        failed.update((c.seq_id, bad_slots[c.slot]) for c in plan.prefill if c.slot in bad_slots)
        if chunks:
            try:
                logits += self._prefill(chunks, sampling, weights, prompt_lps)
                row_ids += [c.seq_id for c in chunks if c.sample]
            except Exception as e:  # reported: one packed pass, so every chunk of it fails
                failed.update((c.seq_id, e) for c in chunks)
                for c in chunks:
                    prompt_lps.pop(c.seq_id, None)
        if plan.decode:
            try:
                logits.append(self._decode(plan, sampling, weights))
                row_ids += [r.seq_id for r in plan.decode]
            except Exception as e:  # reported: one batched pass, so every row of it fails
                failed.update((r.seq_id, e) for r in plan.decode)
        token_ids, logprobs = {}, {}
        try:
            token_ids, logprobs = sample_rows(self.sampler, self.masks, logits, row_ids, sampling)
        except Exception as e:  # reported: one sampler call for every row that samples
            failed.update((s, e) for s in row_ids)
        for seq_id in failed:
            prompt_lps.pop(seq_id, None)
        return RunnerOutput(StepOutput(token_ids, weights.per_block()), logprobs, prompt_lps, failed)

    def _prefill(self, chunks: list[PrefillChunk], sampling: Mapping[int, SamplingRow], weights: BlockWeights,
                 prompt_lps: dict[int, tuple[int, list[PromptLogprob]]]) -> list[torch.Tensor]:
        """Every chunk in one packed pass; the logits of those that sample, in order. Fills the prompt
        logprobs of the chunks that score them."""
        modes = prefill_modes(sampling, chunks)
        out = self.model.prefill_batch(prefill_inputs(self.spec, sampling, chunks, modes), self.pools.states,
                                       self.pools.ckpts, self.prefill_kernels, self.selections)
        if self.spec.reads_cache:
            weights.add(out.block_ids, out.block_weights)
        return split_prefill_logits(chunks, out.logits, modes, sampling, self.sampler.vocab_size, prompt_lps)

    def _decode(self, plan: StepPlan, sampling: Mapping[int, SamplingRow], weights: BlockWeights) -> torch.Tensor:
        """One token for every decode row; logits [B, V]."""
        ks = [request_top_k(self.spec, sampling, r.seq_id) for r in plan.decode]
        b = pack_decode(plan.decode, ks, self.spec.top_k, self.device)
        out, w = self.model.decode(b.token_ids, b.slots, b.positions, b.block_table, b.write_blocks,
                                   self.pools.states, self.pools.ckpts, b.top_k, selections=self.selections,
                                   write_rows=b.write_rows, top_k_max=b.top_k_max)
        if b.block_table.shape[1] and self.spec.reads_cache:
            weights.add(b.block_table, w)
        return out

    def take_selections(self) -> list[int]:
        counts = self.selections.tolist()  # one device->host transfer
        self.selections.zero_()
        return counts


