"""The device tensors a runner owns and the plan stages that only move data between them: block
copies between the GPU checkpoint pool and the host pool (`copy`), slot resets and restores
(`prepare_slots`): plan.py stages 1-3."""

from __future__ import annotations

import torch

from mcserve.server.engine.plan import BlockCopy, StepPlan
from mcserve.server.engine.runner.base import TransferError
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM


class DevicePools:
    """State slots and the GPU checkpoint pool on the model's device; the host pool (pinned on CUDA)
    when offloading is on. `scratch_blocks` extra GPU blocks past the cache's (which the cache never
    hands out) take the writes that graph-captured code aims at "no block"."""

    def __init__(self, model: MCGatedDeltaNetForCausalLM, num_state_slots: int, num_checkpoint_blocks: int,
                 num_host_blocks: int = 0, ckpt_dtype: torch.dtype | None = None, scratch_blocks: int = 0) -> None:
        self.model = model
        self.states: StateSlots = model.allocate_states(num_state_slots)
        self.ckpts: CheckpointBlocks = model.allocate_checkpoints(num_checkpoint_blocks + scratch_blocks, ckpt_dtype)
        self.host: CheckpointBlocks | None = None
        if num_host_blocks:
            self.host = CheckpointBlocks.allocate(model.cfg, num_host_blocks, self.ckpts.ssm.dtype, model.dtype,
                                                  "cpu", key_dtype=self.ckpts.key.dtype,
                                                  pin=model.device.type == "cuda")

    def copy(self, plan: StepPlan) -> None:
        """Stages 1-2 of a plan: offloads, then onloads. TransferError if a copy fails."""
        try:
            if plan.offloads:
                assert self.host is not None, "offload planned without a host pool"
                copy_blocks(self.ckpts, self.host, plan.offloads)
            if plan.onloads:
                assert self.host is not None, "onload planned without a host pool"
                copy_blocks(self.host, self.ckpts, plan.onloads)
        except Exception as e:
            raise TransferError(f"block copy failed ({len(plan.offloads)} offloads, {len(plan.onloads)} onloads):"
                                f" {e!r}") from e

    def prepare_slots(self, plan: StepPlan) -> dict[int, Exception]:
        """Stage 3: slot resets and restores. Returns slot -> exception for those that failed."""
        failed: dict[int, Exception] = {}
        for slot in plan.resets:
            try:
                self.states.clear(slot)
            except Exception as e:  # reported: the engine fails that slot's sequence
                failed[slot] = e
        for r in plan.restores:
            try:
                self.model.restore_slot(self.states, r.slot, self.ckpts, r.block_id)
            except Exception as e:  # reported, as above
                failed[r.slot] = e
        return failed


def copy_blocks(src: CheckpointBlocks, dst: CheckpointBlocks, copies: tuple[BlockCopy, ...]) -> None:
    """Copy blocks between the GPU pool and the host pool. Blocking on purpose: a device->host copy
    must land before the host-side scatter reads it, and offloads are rare (only under pressure)."""
    s = torch.tensor([c.src for c in copies], dtype=torch.long)
    d = torch.tensor([c.dst for c in copies], dtype=torch.long)
    s_dev, d_dev = s.to(src.ssm.device), d.to(dst.ssm.device)
    for name in ("ssm", "key", "conv"):
        moved = getattr(src, name)[s_dev]
        getattr(dst, name)[d_dev] = moved.to(dst.ssm.device)
