"""The Gated DeltaNet + Memory Caching causal LM and its three execution paths.

- `forward_reference`: token-by-token recurrence (kernels/reference.py); the ground truth.
- `prefill`: one sequence, segment by segment with the chunked delta rule (kernels/prefill/torch.py),
  reading and writing sequence memory in the engine's pools.
- `prefill_batch`: many chunks of many sequences in one packed pass (batched_prefill.py), the same
  result per chunk; torch rounds on CPU, fla + Triton on CUDA.
- `decode`: one token for each of many sequences (kernels/decode/torch.py), through the same pools.
All three share the projections, convolutions and MLPs below, so they differ only in the core.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn

from mcserve.kernels.decode.torch import decode_mc_gdn
from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.batched import TORCH_KERNELS, PrefillKernels
from mcserve.kernels.prefill.torch import chunked_mc_gdn
from mcserve.kernels.reference import reference_mc_gdn
from mcserve.server.model.batched_prefill import BatchedPrefillOutput, PrefillInput, prefill_batch
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.config import ModelConfig
from mcserve.server.model.layers import Backbone


class MCGatedDeltaNetForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, learned_router=cfg.mc.router == "learned")
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.spec: MCSpec = cfg.mc.spec()
        self._fingerprint: bytes | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.weight.device

    @property
    def state_dtype(self) -> torch.dtype:
        """Recurrent states are fp32 (fp64 when the whole model runs in fp64, for tests)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def fingerprint(self) -> bytes:
        """SHA-256 of what the outputs depend on besides the MC settings: the config and every weight
        (name, dtype, shape, bytes). Computed once, on first call (the loader calls it while the
        weights are still on the host); the weights must not change afterwards."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._fingerprint = h.digest()
        return self._fingerprint

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        w = self.model.embeddings.weight if self.lm_head is None else self.lm_head.weight
        return (x @ w.t()).float()

    def allocate_states(self, num_slots: int) -> StateSlots:
        return StateSlots.allocate(self.cfg, num_slots, self.dtype, self.device, self.state_dtype)

    def allocate_checkpoints(self, num_blocks: int, ckpt_dtype: torch.dtype | None = None) -> CheckpointBlocks:
        return CheckpointBlocks.allocate(self.cfg, num_blocks, ckpt_dtype or self.state_dtype, self.dtype,
                                         self.device, key_dtype=self.state_dtype)

    @torch.inference_mode()
    def forward_reference(self, input_ids: Sequence[int] | torch.Tensor,
                          ckpt_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Logits [T, V] of a whole sequence, token by token. Slow; for tests."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        cfg, sd = self.cfg, self.state_dtype
        x = self.model.embeddings(ids)
        for block in self.model.layers:
            attn = block.attn
            h = block.attn_norm(x)
            conv0 = torch.zeros(cfg.conv_dim, cfg.conv_width, dtype=x.dtype, device=x.device)
            qkv, _ = attn.conv_seq(h, conv0)
            q, k, v, g, beta, u = attn.heads(h, qkv, sd)
            state = torch.zeros(cfg.num_v_heads_, cfg.head_v_dim, cfg.head_dim, dtype=sd, device=x.device)
            key_sum = torch.zeros(cfg.num_heads, cfg.head_dim, dtype=sd, device=x.device)
            y = reference_mc_gdn(q, k, v, g, beta, u, self.spec, 0, state, key_sum, [], [], ckpt_dtype)
            x = x + attn.output(h, y)
            x = x + block.mlp(block.mlp_norm(x))
        return self._logits(x)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        slot: int,
        start_pos: int,
        read_blocks: Sequence[int],
        write_blocks: Sequence[int],
        states: StateSlots,
        ckpts: CheckpointBlocks,
        top_k: int | None = None,
        all_logits: bool = False,
        selections: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tokens at positions start_pos.. of the sequence whose online state is in `slot`.

        read_blocks: the sequence's blocks for segments < start_pos // C (-1 for a dropped one);
        write_blocks: one block per segment boundary completed inside this chunk, in order (-1: don't
        keep that checkpoint, e.g. when the pool is full; later tokens then see it as dropped).
        Returns (logits [T or 1, V], router weight per block [len(read_blocks) + len(write_blocks)]:
        the read blocks, then those written here, which later tokens of the chunk read).
        selections: optional [L] counter; adds per layer how many cached memories were read.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        T, C = ids.shape[0], self.spec.segment_size
        boundaries = [e for e in range(1, T + 1) if (start_pos + e) % C == 0]
        assert len(boundaries) == len(write_blocks), (boundaries, write_blocks)
        assert len(read_blocks) == start_pos // C, (len(read_blocks), start_pos, C)
        # aggregation none reads no cached memory: don't gather any
        rb = torch.as_tensor(list(read_blocks) if self.spec.reads_cache else [], dtype=torch.long, device=self.device)
        valid, rbc = rb >= 0, rb.clamp_min(0)
        sd = self.state_dtype
        weights = torch.zeros(len(read_blocks) + len(write_blocks), dtype=sd, device=self.device)
        x = self.model.embeddings(ids)
        for li, block in enumerate(self.model.layers):
            attn = block.attn
            h = block.attn_norm(x)
            qkv, padded = attn.conv_seq(h, states.conv[li, slot])
            q, k, v, g, beta, u = attn.heads(h, qkv, sd)
            y, s, ks, new, w_read = chunked_mc_gdn(
                q, k, v, g, beta, u, self.spec, start_pos, states.ssm[li, slot], states.key_sum[li, slot],
                ckpts.ssm[rbc, li], ckpts.key[rbc, li], valid, top_k=top_k)
            if self.spec.reads_cache:
                weights += w_read
                if selections is not None:
                    selections[li] += (w_read > 0).sum()
            states.ssm[li, slot] = s
            states.key_sum[li, slot] = ks
            w = self.cfg.conv_width
            if w:
                states.conv[li, slot] = padded[T:].transpose(0, 1)
            for e, b, (c, key) in zip(boundaries, write_blocks, new, strict=True):
                if b < 0:
                    continue
                ckpts.ssm[b, li] = c
                ckpts.key[b, li] = key
                if w:
                    ckpts.conv[b, li] = padded[e:e + w].transpose(0, 1)
            x = x + attn.output(h, y)
            x = x + block.mlp(block.mlp_norm(x))
        return self._logits(x if all_logits else x[-1:]), weights

    def prefill_batch(self, chunks: Sequence[PrefillInput], states: StateSlots, ckpts: CheckpointBlocks,
                      kernels: PrefillKernels = TORCH_KERNELS, selections: torch.Tensor | None = None,
                      utility: torch.Tensor | None = None, layer_weights: list[torch.Tensor] | None = None
                      ) -> BatchedPrefillOutput:
        """Every chunk of a step in one packed pass (server/model/batched_prefill.py); each chunk's result
        equals `prefill` on it."""
        return prefill_batch(self, chunks, states, ckpts, kernels, selections, utility, layer_weights)

    @torch.inference_mode()
    def decode(
        self,
        input_ids: torch.Tensor,  # [B]
        slots: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B]
        block_table: torch.Tensor,  # [B, N], -1 = none
        write_blocks: torch.Tensor,  # [B], -1 = not a boundary
        states: StateSlots,
        ckpts: CheckpointBlocks,
        top_k: torch.Tensor | None = None,  # [B]
        selections: torch.Tensor | None = None,  # [L] counter, as in `prefill`
        write_rows: torch.Tensor | None = None,  # rows whose write_blocks >= 0 (saves a device sync)
        top_k_max: int | None = None,  # max(top_k) (saves a device sync)
        layer_weights: list[torch.Tensor] | None = None,  # gets each layer's weights [B, N], as in prefill_batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for each row. Returns (logits [B, V], router weight per table entry [B, N])."""
        sd = self.state_dtype
        weights = torch.zeros(block_table.shape, dtype=sd, device=self.device)
        boundary_rows = (write_blocks >= 0).nonzero().squeeze(-1) if write_rows is None else write_rows
        x = self.model.embeddings(input_ids)
        for li, block in enumerate(self.model.layers):
            attn = block.attn
            h = block.attn_norm(x)
            qkv, conv = attn.conv_step(h, states.conv[li, slots])
            states.conv[li, slots] = conv
            q, k, v, g, beta, u = attn.heads(h, qkv, sd)
            y, w = decode_mc_gdn(q, k, v, g, beta, u, self.spec, positions, slots, states.ssm[li],
                                 states.key_sum[li], ckpts.ssm[:, li], ckpts.key[:, li], block_table,
                                 write_blocks, top_k, boundary_rows, top_k_max)
            if w is not None:
                weights += w
                if selections is not None:
                    selections[li] += (w > 0).sum()
                if layer_weights is not None:
                    layer_weights.append(w)
            if boundary_rows.numel() and self.cfg.conv_width:
                ckpts.conv[write_blocks[boundary_rows], li] = conv[boundary_rows]
            x = x + attn.output(h, y)
            x = x + block.mlp(block.mlp_norm(x))
        return self._logits(x), weights

    def restore_slot(self, states: StateSlots, slot: int, ckpts: CheckpointBlocks, block: int) -> None:
        """Resume a sequence at the end of the segment cached in `block`."""
        if self.spec.reset:
            states.ssm[:, slot].zero_()
        else:
            states.ssm[:, slot] = ckpts.ssm[block].to(states.ssm.dtype)
        states.key_sum[:, slot].zero_()
        states.conv[:, slot] = ckpts.conv[block].to(states.conv.device)
