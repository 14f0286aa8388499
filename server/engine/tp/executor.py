"""One rank's execution of a step on its shard: the same forward on every rank, in the same order,
so that the collectives inside the model (two all-reduces per layer) pair up.

Stages as the torch runner runs them (plan.py's order): block copies and slot resets/restores on
this rank's pools, every prefill chunk in one `prefill_batch`, the decode rows in one `decode`.
Unlike the torch runner, no stage may drop some sequences and go on: every rank must run the same
forward, so any failure fails the step (runner.py).
Routing needs no communication: SSC's top-k, GRM's gates and every readout are per q/k head, and a
rank holds whole heads with the v-heads they feed. Only the step's feedback crosses ranks: each
rank's router weights per layer are partial sums over its own heads, so they are summed onto rank 0
in one `reduce` per step (only when checkpoints were read), which then derives the weight per block
and the reads per layer exactly as one device would.
Logits exist on rank 0 only (`ShardedMCGatedDeltaNet`); sampling is the caller's (runner.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcserve.kernels.prefill.batched import select_kernels
from mcserve.server.engine.runner.decode_batch import pack_decode
from mcserve.server.engine.runner.pools import DevicePools
from mcserve.server.engine.runner.router_weights import BlockWeights
from mcserve.server.engine.tp.group import TPGroup
from mcserve.server.engine.tp.step_message import Setup, StepMessage
from mcserve.server.model.batched_prefill import PrefillInput
from mcserve.server.model.sharding import ShardedMCGatedDeltaNet


@dataclass(frozen=True, slots=True)
class StepLogits:
    """prefill: per chunk its logits (`[1, V]` last, `[T, V]` all, or None); decode: `[B, V]` or None.
    Empty (`[R, 0]`) on ranks other than 0."""

    prefill: list[torch.Tensor | None]
    decode: torch.Tensor | None


class ShardExecutor:
    def __init__(self, model: ShardedMCGatedDeltaNet, group: TPGroup, setup: Setup) -> None:
        self.model, self.group = model, group
        self.spec = model.spec
        self.device = model.device
        self.pools = DevicePools(model, setup.num_state_slots, setup.num_checkpoint_blocks, setup.num_host_blocks,
                                 setup.ckpt_dtype)  # type: ignore[arg-type]
        self.prefill_kernels = select_kernels(self.device, self.spec, model.dtype)

    @torch.inference_mode()
    def forward(self, msg: StepMessage, logits: Sequence[str] | None = None) -> tuple[StepLogits, BlockWeights,
                                                                                    torch.Tensor | None]:
        """Run `msg.plan` on this rank's shard. `logits`: per prefill chunk "last" / "all" / "none"
        (rank 0); None: "none" for every chunk (the other ranks).

        Returns the logits, the router weight per block read (summed over every rank's heads on
        rank 0) and the checkpoint reads per layer (rank 0; None when no checkpoint was read)."""
        plan = msg.plan
        self.pools.copy(plan)
        bad = self.pools.prepare_slots(plan)
        if bad:  # dropping those chunks on this rank alone would desynchronise the collectives
            slot, error = next(iter(bad.items()))
            raise RuntimeError(f"preparing state slot {slot} failed: {error!r}") from error
        states, ckpts = self.pools.states, self.pools.ckpts
        parts: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (block ids, this rank's weights per layer)
        prefill_logits: list[torch.Tensor | None] = []
        if plan.prefill:
            modes = logits if logits is not None else ["none"] * len(plan.prefill)
            chunks = [PrefillInput(c.token_ids, c.slot, c.start_pos, c.read_blocks, c.write_blocks, k, mode)
                      for c, k, mode in zip(plan.prefill, msg.prefill_top_k, modes, strict=True)]
            layers: list[torch.Tensor] = []
            out = self.model.prefill_batch(chunks, states, ckpts, self.prefill_kernels, layer_weights=layers)
            parts.append((out.block_ids, layers))
            prefill_logits = out.logits
        decode_logits = None
        if plan.decode:
            b = pack_decode(plan.decode, list(msg.decode_top_k), self.spec.top_k, self.device)
            layers = []
            decode_logits, _ = self.model.decode(b.token_ids, b.slots, b.positions, b.block_table, b.write_blocks,
                                                 states, ckpts, b.top_k, write_rows=b.write_rows,
                                                 top_k_max=b.top_k_max, layer_weights=layers)
            parts.append((b.block_table.flatten(), layers))
        weights, reads = self._reduce(parts)
        return StepLogits(prefill_logits, decode_logits), weights, reads

    def _reduce(self, parts: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> tuple[BlockWeights, torch.Tensor | None]:
        """One reduce onto rank 0 of every layer's router weights, then on rank 0 the weight per block
        (summed over the layers) and the reads per layer ((row, entry) pairs some head of any rank
        read: a weight > 0 once summed, as the torch runner counts them). Every rank has the same
        shapes from the plan, so all or none of them reduce."""
        weights = BlockWeights()
        parts = [(ids, torch.stack(layers).flatten(1)) for ids, layers in parts if layers]
        if not (self.spec.reads_cache and parts):
            return weights, None
        flat = torch.cat([w.flatten() for _, w in parts])
        self.group.reduce_to_first(flat)
        if self.group.rank != 0:
            return weights, None
        reads = torch.zeros(self.model.cfg.num_hidden_layers, dtype=torch.long, device=self.device)
        off = 0
        for ids, w in parts:
            summed = flat[off:off + w.numel()].view(w.shape)  # [L, entries]
            off += w.numel()
            weights.add(ids, summed.sum(0))
            reads += (summed > 0).sum(1)
        return weights, reads
