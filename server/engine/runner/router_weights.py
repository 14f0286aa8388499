"""Router weight per checkpoint block read in a step: the feedback that SSC's utility policy
(server/engine/cache/utility.py) ranks blocks by."""

from __future__ import annotations

import torch


class BlockWeights:
    """Collects (block ids read, router weight each got) on the device during a step; `per_block`
    brings the sums back in one device->host transfer."""

    def __init__(self) -> None:
        self._ids: list[torch.Tensor] = []  # block ids read, -1 = hole or padding
        self._weights: list[torch.Tensor] = []  # the weight each got, same shape

    def add(self, block_ids: torch.Tensor, weights: torch.Tensor) -> None:
        assert block_ids.shape == weights.shape, (block_ids.shape, weights.shape)
        self._ids.append(block_ids.reshape(-1))
        self._weights.append(weights.reshape(-1))

    def per_block(self) -> dict[int, float]:
        """Sum of weights per block id, skipping holes (-1) and zero weights."""
        if not self._ids:
            return {}
        ids, w = torch.cat(self._ids), torch.cat([x.double() for x in self._weights])
        keep = (ids >= 0) & (w > 0)
        pairs = torch.stack([ids.double(), w])[:, keep].t().tolist()
        out: dict[int, float] = {}
        for block, x in pairs:
            out[int(block)] = out.get(int(block), 0.0) + x
        return out
