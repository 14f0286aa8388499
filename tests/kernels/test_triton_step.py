"""The decode step's fused glue kernels against the model's torch modules (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
step = pytest.importorskip("mcserve.kernels.triton_step")

from mcserve.server.model.layers import RMSNorm, ShortConv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize(("D", "W"), [(37, 4), (300, 3), (37, 6)])  # D past one 256-channel program; W+1 not 2^n
def test_conv_step_updates_slots_in_place_and_skips_padding(bias: bool, ckpt: bool, D: int, W: int) -> None:
    B, slots_n, blocks_n = 5, 9, 6
    conv = ShortConv(D, W, bias).to(DEV)
    conv.weight.data = _rand(D, 1, W, seed=1)
    if bias:
        conv.bias.data = _rand(D, seed=2)
    proj = _rand(B, D + 11, seed=3)  # x is a strided slice of a wider projection row
    x = proj[:, 5:5 + D]
    pool = _rand(slots_n, D, W - 1, seed=4)
    # one layer's view of a [blocks, L, D, W-1] checkpoint pool (strided blocks, as DecodeStep passes it)
    blocks = _rand(blocks_n, 3, D, W - 1, seed=6)
    slots = torch.tensor([3, -1, 0, 8, -1], device=DEV)
    writes = torch.tensor([4, 2, -1, 0, -1], device=DEV)  # row 1 is padding: its block must stay
    live = slots >= 0
    want_y, want_state = conv.forward_step(x[live], pool[slots[live]])
    before, blocks_before = pool.clone(), blocks.clone()
    y = step.conv_step(x, pool, slots, conv.weight[:, 0, :].contiguous(), conv.bias,
                       *((blocks[:, 1], writes) if ckpt else ()))
    torch.testing.assert_close(y[live], want_y, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[~live], torch.zeros_like(y[~live]))
    assert torch.equal(pool[slots[live]], want_state)  # a shift: exact
    untouched = [s for s in range(slots_n) if s not in (3, 0, 8)]
    assert torch.equal(pool[untouched], before[untouched])
    want_blocks = blocks_before.clone()
    if ckpt:
        want_blocks[[4, 0], 1] = torch.stack([pool[3], pool[8]])  # live rows with a block: their new state
    assert torch.equal(blocks, want_blocks)


@pytest.mark.parametrize("add", [False, True])
def test_add_rmsnorm(add: bool) -> None:
    D = 45
    norm = RMSNorm(D, 1e-6).to(DEV)
    norm.weight.data = _rand(D, seed=5)
    x = _rand(6, D, seed=6).bfloat16() if DEV == "cuda" else _rand(6, D, seed=6)
    dx = _rand(6, D + 3, seed=7)[:, :D].to(x.dtype) if add else None
    xo, h = step.add_rmsnorm(x, dx, norm.weight, norm.eps)
    want_x = x + dx if add else x
    assert torch.equal(xo, want_x)
    torch.testing.assert_close(h, norm(want_x), atol=1e-5, rtol=1e-5)


def test_swiglu_fused() -> None:
    M = 1500
    gu = _rand(3, 2 * M + 4, seed=8)[:, :2 * M]
    got = step.swiglu_fused(gu)
    torch.testing.assert_close(got, F.silu(gu[:, :M]) * gu[:, M:], atol=1e-5, rtol=1e-5)
