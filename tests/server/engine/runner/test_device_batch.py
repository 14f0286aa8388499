"""DeviceBatch.step_inputs: the fused Triton gather (one launch; Triton's interpreter on CPU) against
the torch ops it replaces (gather, the write blocks' utility zeroed, positions advanced), on a
persistent batch with padding rows, boundaries, tables of every length, and widths below and above
the table's."""

from __future__ import annotations

import os

import pytest
import torch

from mcserve.server.engine.runner.device_batch import DeviceBatch

C, CAP, FULL = 4, 7, 300  # FULL: not a power of two


def _batch(seed: int) -> DeviceBatch:
    g = torch.Generator().manual_seed(seed)
    b = DeviceBatch(CAP, FULL, C, 3, torch.device("cpu"))
    lengths = torch.randint(0, FULL + 1, (CAP,), generator=g)
    for r in range(CAP):
        n = int(lengths[r])
        b.table[r, :n] = torch.randint(-1, 40, (n,), generator=g)  # -1: holes
    b.slots[:CAP] = torch.randperm(CAP, generator=g)
    b.slots[2] = -1  # a free row
    b.positions[:CAP] = torch.randint(0, FULL * C, (CAP,), generator=g)
    b.positions[1] = 7 * C - 1  # a boundary whose block is known
    b.table[1, 6] = 11
    b.tokens[:CAP] = torch.randint(0, 500, (CAP,), generator=g)
    b.top_k[:CAP] = torch.randint(1, 5, (CAP,), generator=g)
    b.order[:5] = torch.tensor([4, 1, 6, 0, 3])  # then the padding row
    return b


def _clone(b: DeviceBatch) -> DeviceBatch:
    c = _batch(0)
    for name in ("slots", "positions", "tokens", "top_k", "table", "order"):
        getattr(c, name).copy_(getattr(b, name))
    return c


# (5, 512): a CUDA graph's width bucket wider than the table (the torch ops clamp it to the table; the
# fused gather must too: it failed every graph capture on the H200 when it asserted width <= table width)
@pytest.mark.parametrize(("rows", "width"), [(5, 9), (7, FULL), (1, 1), (3, 200), (5, 512)])
def test_fused_gather_equals_torch_ops(rows: int, width: int) -> None:
    ref = _batch(rows * 1000 + width)
    got = _clone(ref)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    u_ref = torch.rand(45)
    u_got = u_ref.clone()
    tok_r, b_r = ref.step_inputs(rows, width, 4, u_ref, 44, fused=False)
    tok_g, b_g = got.step_inputs(rows, width, 4, u_got, 44, fused=True)
    assert torch.equal(tok_g, tok_r)
    for name in ("positions", "slots", "block_table", "write_blocks", "top_k"):
        assert torch.equal(getattr(b_g, name), getattr(b_r, name)), name
    assert b_g.top_k_max == b_r.top_k_max == 4
    assert torch.equal(u_got, u_ref)
    assert torch.equal(got.positions[:CAP], ref.positions[:CAP])  # the padding row's may differ
    if rows >= 2:
        assert b_r.write_blocks[1] == 11 and u_ref[11] == 0
