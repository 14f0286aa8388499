"""Executes a StepPlan on the model: block transfers, slot resets and restores, prefill chunks, one
batched decode, sampling, and the router weights that feed each checkpoint's SSC utility.

The runner owns the device tensors (state slots, the GPU checkpoint pool, the host offload pool); who
holds which slot or block is the scheduler's bookkeeping. Stages run in the order plan.py gives.

Host/device traffic per step: the decode metadata goes over in one pinned, non-blocking copy; the
sampler brings the tokens back in one transfer; the router weights come back in one more (only
for aggregations that read checkpoints). Prefill chunks pass their token ids to the model, which
copies them itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mcserve.server.engine.plan import BlockCopy, StepOutput, StepPlan
from mcserve.server.engine.sampler import Sampler, SamplingRow
from mcserve.server.model.cache_tensors import CheckpointBlocks
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

# Columns of the decode metadata before the block table (see _decode_meta).
_TOKEN, _SLOT, _POS, _WRITE, _TOPK, _TABLE = range(6)


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """What one step produced.

    step: sampled tokens and block weights for the scheduler.
    logprobs: seq_id -> (chosen token's logprob, [(token_id, logprob)] best first), only for rows
        whose params ask for logprobs.
    """

    step: StepOutput
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)


class ModelRunner:
    """Device memory for sequences plus the code that runs a plan on it.

    `sampling` (seq_id -> SamplingRow) must cover every decode row and every prefill chunk that samples;
    a row's `params.mc_top_k` also sets SSC's k for that sequence's chunks.
    """

    def __init__(self, model: MCGatedDeltaNetForCausalLM, num_state_slots: int, num_checkpoint_blocks: int,
                 num_host_blocks: int = 0, ckpt_dtype: torch.dtype | None = None, seed: int | None = None,
                 vocab_size: int | None = None) -> None:
        self.model = model
        self.device = model.device
        self.spec = model.spec
        self.states = model.allocate_states(num_state_slots)
        self.ckpts = model.allocate_checkpoints(num_checkpoint_blocks, ckpt_dtype)
        self.host: CheckpointBlocks | None = None
        if num_host_blocks:
            self.host = CheckpointBlocks.allocate(model.cfg, num_host_blocks, self.ckpts.ssm.dtype, model.dtype,
                                                  "cpu", key_dtype=self.ckpts.key.dtype,
                                                  pin=self.device.type == "cuda")
        # (sequence, checkpoint) reads per layer since the last `take_selections`; stays on the device
        self.selections = torch.zeros(model.cfg.num_hidden_layers, dtype=torch.long, device=self.device)
        # vocab_size: what may be sampled (a tokenizer smaller than a padded lm_head)
        self.sampler = Sampler(vocab_size or model.cfg.vocab_size, self.device, seed=seed)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> RunnerOutput:
        if plan.offloads:
            assert self.host is not None, "offload planned without a host pool"
            _copy_blocks(self.ckpts, self.host, plan.offloads)
        if plan.onloads:
            assert self.host is not None, "onload planned without a host pool"
            _copy_blocks(self.host, self.ckpts, plan.onloads)
        for slot in plan.resets:
            self.states.clear(slot)
        for r in plan.restores:
            self.model.restore_slot(self.states, r.slot, self.ckpts, r.block_id)

        logits: list[torch.Tensor] = []
        rows: list[SamplingRow] = []
        row_ids: list[int] = []
        weight_ids: list[torch.Tensor] = []  # block ids read, -1 = hole or padding
        weights: list[torch.Tensor] = []  # router weight each got, same shape
        for chunk in plan.prefill:
            top_k = self._top_k(sampling, chunk.seq_id)
            out, w = self.model.prefill(chunk.token_ids, chunk.slot, chunk.start_pos, chunk.read_blocks,
                                        chunk.write_blocks, self.states, self.ckpts, top_k=top_k,
                                        selections=self.selections)
            if chunk.read_blocks and self.spec.reads_cache:
                weight_ids.append(torch.tensor(chunk.read_blocks, dtype=torch.long).to(self.device, non_blocking=True))
                weights.append(w)
            if chunk.sample:
                logits.append(out)
                rows.append(sampling[chunk.seq_id])
                row_ids.append(chunk.seq_id)
        if plan.decode:
            meta, write_rows, k_max = self._decode_meta(plan, sampling)
            table = meta[_TABLE:].t()  # [B, N]
            top_k = meta[_TOPK] if any(sampling[r.seq_id].params.mc_top_k for r in plan.decode) else None
            out, w = self.model.decode(meta[_TOKEN], meta[_SLOT], meta[_POS], table, meta[_WRITE],
                                       self.states, self.ckpts, top_k, selections=self.selections,
                                       write_rows=write_rows, top_k_max=k_max)
            if table.shape[1] and self.spec.reads_cache:
                weight_ids.append(table.reshape(-1))
                weights.append(w.reshape(-1))
            logits.append(out)
            rows.extend(sampling[r.seq_id] for r in plan.decode)
            row_ids.extend(r.seq_id for r in plan.decode)

        token_ids: dict[int, int] = {}
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if rows:
            sampled = self.sampler(torch.cat(logits), rows)
            token_ids = dict(zip(row_ids, sampled.token_ids, strict=True))
            if sampled.logprobs is not None:
                assert sampled.top_logprobs is not None
                for i, (seq_id, row) in enumerate(zip(row_ids, rows, strict=True)):
                    if row.params.logprobs is not None:
                        logprobs[seq_id] = (sampled.logprobs[i], sampled.top_logprobs[i])
        return RunnerOutput(StepOutput(token_ids, _block_weights(weight_ids, weights)), logprobs)

    def take_selections(self) -> list[int]:
        """Checkpoint reads per layer since the last call (one device->host transfer), then reset."""
        counts = self.selections.tolist()
        self.selections.zero_()
        return counts

    def _top_k(self, sampling: Mapping[int, SamplingRow], seq_id: int) -> int | None:
        """SSC's k for one sequence: the request's `mc_top_k` can only lower the model's. A chunk
        that does not sample may have no row; it reads with the model's k."""
        row = sampling.get(seq_id)
        k = None if row is None else row.params.mc_top_k
        return None if k is None else min(k, self.spec.top_k)

    def _decode_meta(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every per-row input of the decode in one int64 tensor [6 + N, B] on the device: token, slot,
        position, write block, SSC k, then the block table (-1 padded) transposed, so each of the
        first rows is a contiguous [B] vector. Also what the host knows and the device would need a
        sync to find: the rows that write a checkpoint (on the device) and the largest SSC k."""
        width = max(len(r.block_table) for r in plan.decode)
        cols, ks, write_rows = [], [], []
        for i, r in enumerate(plan.decode):
            k = self._top_k(sampling, r.seq_id)
            ks.append(self.spec.top_k if k is None else k)
            if r.write_block >= 0:
                write_rows.append(i)
            pad = (-1,) * (width - len(r.block_table))
            cols.append((r.token_id, r.slot, r.position, r.write_block, ks[-1], *r.block_table, *pad))
        meta = torch.tensor(cols, dtype=torch.long).t().contiguous()
        rows = torch.tensor(write_rows, dtype=torch.long)
        if self.device.type == "cuda":
            meta = meta.pin_memory().to(self.device, non_blocking=True)
            rows = rows.pin_memory().to(self.device, non_blocking=True) if write_rows else rows.to(self.device)
        return meta, rows, max(ks)


def _copy_blocks(src: CheckpointBlocks, dst: CheckpointBlocks, copies: tuple[BlockCopy, ...]) -> None:
    """Copy blocks between the GPU pool and the host pool. Blocking on purpose: a device->host copy
    must land before the host-side scatter reads it, and offloads are rare (only under pressure)."""
    s = torch.tensor([c.src for c in copies], dtype=torch.long)
    d = torch.tensor([c.dst for c in copies], dtype=torch.long)
    s_dev, d_dev = s.to(src.ssm.device), d.to(dst.ssm.device)
    for name in ("ssm", "key", "conv"):
        moved = getattr(src, name)[s_dev]
        getattr(dst, name)[d_dev] = moved.to(dst.ssm.device)


def _block_weights(ids: list[torch.Tensor], weights: list[torch.Tensor]) -> dict[int, float]:
    """Sum of router weights per GPU block id, skipping holes (-1) and zero weights; one transfer."""
    if not ids:
        return {}
    flat_ids, flat_w = torch.cat(ids), torch.cat([w.double() for w in weights])
    keep = (flat_ids >= 0) & (flat_w > 0)
    pairs = torch.stack([flat_ids.double(), flat_w])[:, keep].t().tolist()
    out: dict[int, float] = {}
    for block, w in pairs:
        out[int(block)] = out.get(int(block), 0.0) + w
    return out
