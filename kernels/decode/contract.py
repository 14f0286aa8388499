"""What a decode path receives: the batch's per-row metadata and one layer's memory, as plain data.

Every decode path (torch, Triton) is a function with the signature of `DecodeFn`; the runner picks
one at start-up (`mcserve.kernels.decode.get_decode_path`) and never branches on it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from mcserve.kernels.mc_spec import MCSpec


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Per-row metadata of one decode step, shared by all layers.

    positions: [B] int, the position of this token (0-based from the first prompt token).
    slots: [B] int, the row's state slot; -1 marks a padded row, which reads and writes nothing
        (its output row is zero).
    block_table: [B, N] int, block of cached segment i or -1 (a hole: dropped, or padding). Entries
        at index >= position // C are not read either. Any strides.
    write_blocks: [B] int, the block that receives this token's checkpoint and segment key when the
        token ends a segment (position % C == C - 1), else -1. A write block is read by no row.
    top_k: [B] int SSC k per row (<= top_k_max), or None for spec.top_k everywhere.
    top_k_max: max(top_k) if the host knows it (otherwise a path may sync to find it).
    write_rows: the rows with write_blocks >= 0, if the host knows them (an empty tensor tells a
        path that no row writes; None: unknown, paths check per row or sync).
    live_rows: the rows with slots >= 0, if the host knows them (the torch path needs them).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    block_table: torch.Tensor
    write_blocks: torch.Tensor
    top_k: torch.Tensor | None = None
    top_k_max: int | None = None
    write_rows: torch.Tensor | None = None
    live_rows: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.positions.shape[0]


@dataclass(frozen=True, slots=True)
class LayerMemory:
    """One layer's views of the pools (a layer's slice of the [L, ...] / [blocks, L, ...] tensors).

    state: [slots, HV, dv, dk] fp32 online states, updated in place.
    key_sum: [slots, H, dk] fp32 sum of the current segment's normalised keys, updated in place.
    ckpt: [blocks, HV, dv, dk] checkpoints (bf16 on GPU), written at boundaries, read by the router.
    ckpt_key: [blocks, H, dk] segment keys (mean of a segment's keys), written at boundaries.
    ckpt_sum: [slots, HV, dv, dk] fp32 running sum of the slot's cached checkpoints (as stored,
        i.e. rounded to ckpt's dtype), or None. Required by `residual`, which then reads O(1)
        memories per step; paths add each new checkpoint to it after the token's readout. It must
        equal the sum over the row's readable table entries: `rebuild_ckpt_sum` after a restore or
        after dropping a running sequence's block.
    utility: [blocks] fp32, or None; paths add the router weight each table entry got (gamma,
        summed over q/k heads; `residual` counts 1 per head) to its block.
    """

    state: torch.Tensor
    key_sum: torch.Tensor
    ckpt: torch.Tensor
    ckpt_key: torch.Tensor
    ckpt_sum: torch.Tensor | None = None
    utility: torch.Tensor | None = None


class DecodeFn(Protocol):
    def __call__(
        self,
        q_raw: torch.Tensor,  # [B, H, dk] after the short conv, before the L2 norm
        k_raw: torch.Tensor,  # [B, H, dk]
        v: torch.Tensor,  # [B, HV, dv]
        a: torch.Tensor,  # [B, HV] a_proj output (before dt_bias and softplus)
        b: torch.Tensor,  # [B, HV] b_proj output (before the sigmoid)
        u_raw: torch.Tensor | None,  # [B, H, dk] u_proj output (learned router), None: query router
        A_log: torch.Tensor,  # [HV]
        dt_bias: torch.Tensor,  # [HV]
        *,
        spec: MCSpec,
        batch: DecodeBatch,
        memory: LayerMemory,
        allow_neg_eigval: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One token for every row; returns y [B, HV, dv] (the core output before o_norm) in
        out_dtype (default: the state's dtype)."""
        ...


def check_decode_inputs(q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor, u_raw: torch.Tensor | None, A_log: torch.Tensor, dt_bias: torch.Tensor,
                        spec: MCSpec, batch: DecodeBatch, memory: LayerMemory) -> None:
    """Raise ValueError naming the tensor and its actual shape/dtype/stride/device when the inputs do
    not fit `DecodeFn`'s contract. Inner dims must be packed ([.., dk] rows contiguous); leading (row,
    slot, block) strides are free, so a layer's view of a [blocks, L, ...] pool is fine."""
    if q_raw.dim() != 3:
        raise ValueError(f"q_raw must be [B, H, dk], got shape {tuple(q_raw.shape)}")
    B, H, dk = q_raw.shape
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] % H:
        raise ValueError(f"v must be [B={B}, HV, dv] with HV a multiple of H={H}, got {tuple(v.shape)}")
    HV, dv = v.shape[1], v.shape[2]
    want = {"q_raw": (q_raw, (B, H, dk)), "k_raw": (k_raw, (B, H, dk)), "v": (v, (B, HV, dv)),
            "a": (a, (B, HV)), "b": (b, (B, HV)), "A_log": (A_log, (HV,)), "dt_bias": (dt_bias, (HV,))}
    if u_raw is not None:
        want["u_raw"] = (u_raw, (B, H, dk))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")

    N = batch.block_table.shape[1] if batch.block_table.dim() == 2 else -1
    ints = {"positions": (batch.positions, (B,)), "slots": (batch.slots, (B,)),
            "write_blocks": (batch.write_blocks, (B,)), "block_table": (batch.block_table, (B, N))}
    if batch.top_k is not None:
        ints["top_k"] = (batch.top_k, (B,))
    for name, (t, shape) in ints.items():
        if tuple(t.shape) != shape or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")

    pools = {"state": (memory.state, (HV, dv, dk)), "key_sum": (memory.key_sum, (H, dk)),
             "ckpt": (memory.ckpt, (HV, dv, dk)), "ckpt_key": (memory.ckpt_key, (H, dk))}
    if memory.ckpt_sum is not None:
        pools["ckpt_sum"] = (memory.ckpt_sum, (HV, dv, dk))
    for name, (t, inner) in pools.items():
        if tuple(t.shape[1:]) != inner:
            raise ValueError(f"{name} pool must be [*, {', '.join(map(str, inner))}], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} pool must be floating point, got {t.dtype}")
        packed = [math.prod(inner[i + 1:]) for i in range(len(inner))]
        if any(s != p and n > 1 for s, p, n in zip(t.stride()[1:], packed, inner, strict=True)):
            raise ValueError(f"{name} pool must have packed inner dims (strides {packed}), got {t.stride()[1:]}")
    if memory.key_sum.shape[0] != memory.state.shape[0]:
        raise ValueError(f"key_sum pool has {memory.key_sum.shape[0]} slots, state has {memory.state.shape[0]}")
    if memory.ckpt_key.shape[0] != memory.ckpt.shape[0]:
        raise ValueError(f"ckpt_key pool has {memory.ckpt_key.shape[0]} blocks, ckpt has {memory.ckpt.shape[0]}")
    if memory.ckpt_sum is not None and memory.ckpt_sum.shape[0] != memory.state.shape[0]:
        raise ValueError(f"ckpt_sum pool has {memory.ckpt_sum.shape[0]} slots, state has {memory.state.shape[0]}")
    if memory.utility is not None and (tuple(memory.utility.shape) != (memory.ckpt.shape[0],)
                                       or memory.utility.stride(0) != 1):
        raise ValueError(f"utility must be a contiguous [{memory.ckpt.shape[0]}] tensor (one per block), "
                         f"got {tuple(memory.utility.shape)}")
    if spec.aggregation == "residual" and memory.ckpt_sum is None:
        raise ValueError("aggregation 'residual' needs memory.ckpt_sum (the running sum of cached checkpoints)")

    tensors = {**{n: t for n, (t, _) in want.items()}, **{n: t for n, (t, _) in ints.items()},
               **{n: t for n, (t, _) in pools.items()}}
    if memory.utility is not None:
        tensors["utility"] = memory.utility
    for name, t in tensors.items():
        if t.device != q_raw.device:
            raise ValueError(f"{name} is on {t.device}, q_raw on {q_raw.device}: all inputs must share a device")
