"""Router weight per GPU checkpoint block, accumulated on the device and decayed there: the feedback
SSC's utility policy ranks blocks by (server/engine/cache/utility.py), without a per-step transfer.

`acc[b]` is the weight block b's checkpoint has got, each step's weight decayed by `decay` per step
since (the paths add into it: the decode kernels per table entry, `prefill_batch` per block). Each
step starts with `begin`: decay the sums once, and zero the blocks this step hands to a new owner
(fresh write blocks, onload targets), whose old weight belongs to a checkpoint that is gone. `take`
is the only transfer, one device->host copy of [blocks] when the cache asks (before it picks a
victim, and every few steps), decayed to the cache's step; it empties the sums.

The last element is a scratch entry (the runner's scratch block): writes aimed at "no block" land
there in graph-captured code, and `take` never reports it.
"""

from __future__ import annotations

import numpy as np
import torch


class BlockUtility:
    def __init__(self, num_blocks: int, decay: float, device: torch.device) -> None:
        """num_blocks: blocks the cache owns; one scratch entry follows them."""
        self.num_blocks, self.decay, self.device = num_blocks, decay, device
        self.acc = torch.zeros(num_blocks + 1, dtype=torch.float32, device=device)
        self.step = 0  # the step whose weights `acc` holds undecayed

    @property
    def blocks(self) -> torch.Tensor:
        """[num_blocks + 1] the tensor the paths add into (the scratch entry included)."""
        return self.acc

    def begin(self, step: int) -> None:
        """Before the forward of `step`: decay what earlier steps added."""
        if step > self.step and self.decay != 1.0:
            self.acc.mul_(self.decay ** (step - self.step))
        self.step = max(step, self.step)

    def forget(self, blocks: torch.Tensor) -> None:
        """Zero blocks handed to new owners this step (device tensor of block ids)."""
        self.acc.index_fill_(0, blocks, 0.0)

    def take(self, now: int) -> np.ndarray:
        """[num_blocks] float64 weight per block, as of step `now` (>= the last step run); empties the
        sums. One device->host copy (it waits for the step in flight)."""
        acc = self.acc[:self.num_blocks]
        # one copy into float64 (on CPU straight from the tensor's memory; else a device->host copy first)
        weights = np.array((acc if acc.device.type == "cpu" else acc.cpu()).numpy(), dtype=np.float64)
        self.acc.zero_()
        if now > self.step and self.decay != 1.0:
            weights *= self.decay ** (now - self.step)
        return weights
