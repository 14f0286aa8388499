"""Router weights summed per block: holes, padding and zero weights are skipped."""

from __future__ import annotations

import torch

from mcserve.server.engine.runner.router_weights import BlockWeights


def test_sums_per_block_and_skips_holes_and_zeros() -> None:
    w = BlockWeights()
    assert w.per_block() == {}
    w.add(torch.tensor([3, -1, 3, 5]), torch.tensor([0.5, 0.7, 0.25, 0.0]))
    w.add(torch.tensor([[5, 7], [-1, 3]]), torch.tensor([[0.125, 1.0], [2.0, 0.0]], dtype=torch.float64))
    assert w.per_block() == {3: 0.75, 5: 0.125, 7: 1.0}
