"""Device tensors that hold sequence memory: online-state slots and checkpoint blocks.

These are plain storage; who owns which slot or block is the engine's bookkeeping
(server/engine/state_pool.py, server/engine/cache/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcserve.server.model.config import ModelConfig


@dataclass
class StateSlots:
    """One slot per running sequence: the online recurrent state, the running sum of the current
    segment's keys, and the short-convolution state."""

    ssm: torch.Tensor  # [L, slots, HV, dv, dk] fp32
    key_sum: torch.Tensor  # [L, slots, H, dk] fp32
    conv: torch.Tensor  # [L, slots, conv_dim, W-1] model dtype

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str,
                 state_dtype: torch.dtype = torch.float32) -> StateSlots:
        L, H, HV = cfg.num_hidden_layers, cfg.num_heads, cfg.num_v_heads_
        return cls(
            ssm=torch.zeros(L, num_slots, HV, cfg.head_v_dim, cfg.head_dim, dtype=state_dtype, device=device),
            key_sum=torch.zeros(L, num_slots, H, cfg.head_dim, dtype=state_dtype, device=device),
            conv=torch.zeros(L, num_slots, cfg.conv_dim, cfg.conv_width, dtype=dtype, device=device),
        )

    @property
    def num_slots(self) -> int:
        return self.ssm.shape[1]

    def clear(self, slot: int) -> None:
        self.ssm[:, slot].zero_()
        self.key_sum[:, slot].zero_()
        self.conv[:, slot].zero_()

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return cfg.state_bytes() + cfg.num_hidden_layers * cfg.conv_dim * cfg.conv_width * dtype.itemsize


@dataclass
class CheckpointBlocks:
    """One block per cached segment of a sequence: everything needed to read the segment's memory
    (state checkpoint + segment key) and to resume the sequence at the segment's end (conv state;
    with state_init=continue the checkpoint is also the state to resume from)."""

    ssm: torch.Tensor  # [blocks, L, HV, dv, dk] checkpoint dtype
    key: torch.Tensor  # [blocks, L, H, dk] fp32
    conv: torch.Tensor  # [blocks, L, conv_dim, W-1] model dtype

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, ckpt_dtype: torch.dtype, dtype: torch.dtype,
                 device: torch.device | str, key_dtype: torch.dtype = torch.float32,
                 pin: bool = False) -> CheckpointBlocks:
        L, H, HV = cfg.num_hidden_layers, cfg.num_heads, cfg.num_v_heads_

        def empty(*shape: int, dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device, pin_memory=pin)

        return cls(
            ssm=empty(num_blocks, L, HV, cfg.head_v_dim, cfg.head_dim, dt=ckpt_dtype),
            key=empty(num_blocks, L, H, cfg.head_dim, dt=key_dtype),
            conv=empty(num_blocks, L, cfg.conv_dim, cfg.conv_width, dt=dtype),
        )

    @property
    def num_blocks(self) -> int:
        return self.ssm.shape[0]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, ckpt_dtype: torch.dtype, dtype: torch.dtype) -> int:
        conv = cfg.num_hidden_layers * cfg.conv_dim * cfg.conv_width * dtype.itemsize
        return cfg.checkpoint_bytes(ckpt_dtype.itemsize) + conv
