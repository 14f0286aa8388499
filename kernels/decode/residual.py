"""The running sum of a slot's cached checkpoints that `residual` reads instead of all N of them.

Decode paths keep it current by adding each new checkpoint (as stored) at its boundary; this
rebuilds it when the slot's table changes otherwise (a restore from a cached prefix, a dropped or
offloaded block of a running sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rebuild_ckpt_sum(out: torch.Tensor, ckpt: torch.Tensor, blocks: Sequence[int] | torch.Tensor) -> None:
    """out [..., HV, dv, dk] (one slot of a checkpoint-sum pool; leading dims such as layers allowed)
    = the sum of ckpt[b] [..., HV, dv, dk] over the blocks b >= 0 (-1 = hole), added in table order
    in out's dtype, as the decode paths add them one boundary at a time."""
    ids = blocks.tolist() if isinstance(blocks, torch.Tensor) else list(blocks)
    out.zero_()
    for blk in ids:
        if blk >= 0:
            out += ckpt[blk].to(out.dtype)
