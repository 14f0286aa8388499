"""Fused Triton row kernels for the glue of a decode step on CUDA (one token per row), beside the
layer core: the short causal conv step (reads and updates the conv state in its slot, in place),
residual add + RMSNorm, and SwiGLU over a fused gate|up projection row.

Each computes what server/model/layers.py's torch modules compute (fp32 inside, the input's dtype
out; the residual sum is rounded to the stream's dtype before it is normalised, as `x = x + d`
then `norm(x)` does), in one pass instead of eager torch's five or six, so that a batch-1 step is
not a chain of tiny launches. All shapes are fixed by the batch: the kernels capture in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_step_kernel(x, s_x, state, s_sb, slots, w, bias, y, s_y, D,
                      W1: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One (row, BD channels) per program: y = silu(sum_j win_j w_j (+ bias)), win = [state, x];
    the state becomes win[1:]. Rows with slot < 0 (padding) write a zero output, no state."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    m = d < D
    slot = tl.load(slots + row).to(tl.int64)
    if slot < 0:
        tl.store(y + row * s_y + d, tl.zeros([BD], dtype=tl.float32).to(y.dtype.element_ty), mask=m)
        return
    xv = tl.load(x + row * s_x + d, mask=m, other=0.0)
    st = state + slot * s_sb + d * W1
    acc = xv.to(tl.float32) * tl.load(w + d * (W1 + 1) + W1, mask=m, other=0.0).to(tl.float32)
    prev = xv
    for j in tl.static_range(W1):
        # walk the window from the newest input back: state[W1-1] is the most recent
        sj = tl.load(st + (W1 - 1 - j), mask=m, other=0.0)
        acc += sj.to(tl.float32) * tl.load(w + d * (W1 + 1) + (W1 - 1 - j), mask=m, other=0.0).to(tl.float32)
        tl.store(st + (W1 - 1 - j), prev.to(sj.dtype), mask=m)
        prev = sj
    if HAS_BIAS:
        acc += tl.load(bias + d, mask=m, other=0.0).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(y + row * s_y + d, out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _add_norm_kernel(x, dx, w, xo, h, s_x, s_d, s_xo, s_h, D, eps, BD: tl.constexpr, ADD: tl.constexpr):
    """One row per program: s = x + dx (rounded to x's dtype) -> xo; h = RMSNorm(s) * w."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    m = d < D
    xv = tl.load(x + row * s_x + d, mask=m, other=0.0)
    if ADD:
        xv = (xv.to(tl.float32) + tl.load(dx + row * s_d + d, mask=m, other=0.0).to(tl.float32)).to(xv.dtype)
        tl.store(xo + row * s_xo + d, xv, mask=m)
    xf = xv.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    out = xf * inv * tl.load(w + d, mask=m, other=0.0).to(tl.float32)
    tl.store(h + row * s_h + d, out.to(h.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_kernel(gu, s_gu, y, s_y, M, BM: tl.constexpr):
    """y[row, :] = silu(gu[row, :M]) * gu[row, M:2M] (fp32 inside)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    m = i < M
    g = tl.load(gu + row * s_gu + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu + row * s_gu + M + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y + row * s_y + i, (g / (1.0 + tl.exp(-g)) * u).to(y.dtype.element_ty), mask=m)


def conv_step(x: torch.Tensor, state: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, D] (rows may be strided, last dim contiguous), state [slots, D, W-1] one layer's conv pool
    (updated in place through `slots` [B]; rows with slot < 0 are padding), weight [D, W] -> [B, D]."""
    B, D = x.shape
    W1 = state.shape[2]
    assert x.stride(1) == 1 and state.stride(2) == 1 and state.stride(1) == W1, (x.stride(), state.stride())
    assert weight.shape == (D, W1 + 1) and weight.is_contiguous(), weight.shape
    y = torch.empty(B, D, dtype=x.dtype, device=x.device)
    bd = min(1024, triton.next_power_of_2(D))
    if B:
        _conv_step_kernel[(B, triton.cdiv(D, bd))](x, x.stride(0), state, state.stride(0), slots, weight,
                                                   bias if bias is not None else weight, y, y.stride(0), D,
                                                   W1=W1, BD=bd, HAS_BIAS=bias is not None)
    return y


def add_rmsnorm(x: torch.Tensor, dx: torch.Tensor | None, weight: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + dx, RMSNorm(x + dx)) for rows [B, D]; dx None: (x, RMSNorm(x))."""
    B, D = x.shape
    h = torch.empty_like(x)
    xo = torch.empty_like(x) if dx is not None else x
    d = dx if dx is not None else x
    assert x.stride(1) == 1 and d.stride(1) == 1, (x.stride(), d.stride())
    if B:
        _add_norm_kernel[(B,)](x, d, weight, xo, h, x.stride(0), d.stride(0), xo.stride(0), h.stride(0), D, eps,
                               BD=triton.next_power_of_2(D), ADD=dx is not None)
    return xo, h


def swiglu_fused(gu: torch.Tensor) -> torch.Tensor:
    """gu [B, 2M] (gate then up) -> silu(gate) * up [B, M] in gu's dtype."""
    B, M2 = gu.shape
    M = M2 // 2
    assert gu.stride(1) == 1 and M2 == 2 * M, (gu.shape, gu.stride())
    y = torch.empty(B, M, dtype=gu.dtype, device=gu.device)
    bm = min(2048, triton.next_power_of_2(M))
    if B:
        _swiglu_kernel[(B, triton.cdiv(M, bm))](gu, gu.stride(0), y, y.stride(0), M, BM=bm)
    return y
