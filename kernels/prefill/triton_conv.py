"""packed.py's `short_conv_rows` in Triton: the short causal conv + SiLU of packed prefill chunks in
one pass over the rows (taps, bias and SiLU fused; fp32 accumulation, taps in order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(ext, tok_rows, w, b, y, T, D, s_e, s_y,
                 W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    tm, dm = t < T, d < D
    m = tm[:, None] & dm[None, :]
    row = tl.load(tok_rows + t, mask=tm, other=W - 1).to(tl.int64)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        x = tl.load(ext + (row - (W - 1) + j)[:, None] * s_e + d[None, :], mask=m, other=0.0)
        acc += x.to(tl.float32) * tl.load(w + d * W + j, mask=dm, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b + d, mask=dm, other=0.0)[None, :]
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(y + t.to(tl.int64)[:, None] * s_y + d[None, :], out.to(y.dtype.element_ty), mask=m)


def short_conv_triton(ext: torch.Tensor, tok_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> torch.Tensor:
    """ext [rows, D], tok_rows [T], weight [D, W], bias [D] or None -> y [T, D] in ext's dtype."""
    T, (D, W) = tok_rows.shape[0], weight.shape
    assert ext.shape[1] == D and ext.stride(1) == 1, (ext.shape, ext.stride(), weight.shape)
    y = torch.empty(T, D, dtype=ext.dtype, device=ext.device)
    if T == 0:
        return y
    w = weight.float().contiguous()
    b = bias.float().contiguous() if bias is not None else w
    bt, bd = 32, 128
    _conv_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
        ext, tok_rows.contiguous(), w, b, y, T, D, ext.stride(0), y.stride(0),
        W=W, BT=bt, BD=bd, HAS_BIAS=bias is not None)
    return y
