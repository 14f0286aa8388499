"""A weight-streaming matmul for the few rows of a small decode batch, with the decode step's glue
folded in: y = x @ W^T for x [M, K] (M <= MAX_ROWS), W [N, K], optionally

- `norm`: x replaced by RMSNorm(x) * weight first (each program normalises the rows itself: they
  are a few KB; the residual stream's next norm needs no launch of its own),
- `residual`: the result added to a residual [M, N] (the stream's `x + dx`),
- `swiglu`: W holds gate rows [0, n) and up rows [n, 2n); the result is silu(gate) * up [M, n].

Rounding follows the unfused torch ops exactly where they round (the normalised rows, the matmul
output and the residual sum in x's dtype; silu(g) * u of the rounded g and u in fp32), so only the
matmul's summation order differs. Every program streams BN rows of W once, all K unrolled (K is a
compile-time constant: one variant per weight shape), which is what a batch of 1 to 4 rows needs:
cuBLAS picks split-K GEMMs and GEMV kernels at ~55-65% of the copy bandwidth there (H200 profile,
1.3b preset). Experimental: `DecodeStep(small_batch_rows=...)` turns it on; measured by
benchmarks/decode_engine.py --small-batch-gemv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 4


@triton.jit
def _gemv_kernel(x, s_x, w, s_w, y, s_y, r, s_r, nw, M, N, eps,
                 K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 NORM: tl.constexpr, RESID: tl.constexpr, SWIGLU: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    nm = rn < N
    mm = rm < M
    inv = tl.full([BM], 1.0, dtype=tl.float32)
    if NORM:
        ss = tl.zeros([BM], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x + rm[:, None] * s_x + rk[None, :], mask=mm[:, None] & (rk < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xv * xv, axis=1)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < K
        xv = tl.load(x + rm[:, None] * s_x + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        if NORM:
            nwv = tl.load(nw + rk, mask=km, other=0.0).to(tl.float32)
            xv = (xv.to(tl.float32) * inv[:, None] * nwv[None, :]).to(x.dtype.element_ty)
        xf = xv.to(tl.float32)
        wv = tl.load(w + rn[:, None] * s_w + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xf[:, None, :] * wv[None, :, :], axis=2)
        if SWIGLU:
            wu = tl.load(w + (rn + N)[:, None] * s_w + rk[None, :], mask=nm[:, None] & km[None, :],
                         other=0.0).to(tl.float32)
            acc_u += tl.sum(xf[:, None, :] * wu[None, :, :], axis=2)
    out_dt = y.dtype.element_ty
    out = acc.to(out_dt).to(tl.float32)  # the matmul's output as torch rounds it
    if SWIGLU:
        u = acc_u.to(out_dt).to(tl.float32)
        out = out / (1.0 + tl.exp(-out)) * u
    om = mm[:, None] & nm[None, :]
    if RESID:
        out = tl.load(r + rm[:, None] * s_r + rn[None, :], mask=om, other=0.0).to(tl.float32) + out
    tl.store(y + rm[:, None] * s_y + rn[None, :], out.to(out_dt), mask=om)


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: tuple[torch.Tensor, float] | None = None,
         residual: torch.Tensor | None = None, swiglu: int | None = None) -> torch.Tensor:
    """x [M, K] (rows may be strided), w [N', K] contiguous rows -> [M, N] in x's dtype; N = N' (or
    `swiglu`, the gate rows' count, with the up rows following). norm: (weight [K], eps)."""
    M, K = x.shape
    assert M <= MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == K, (x.shape, w.shape)
    N = swiglu if swiglu is not None else w.shape[0]
    assert swiglu is None or w.shape[0] >= 2 * swiglu, (w.shape, swiglu)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == (M, N) and residual.stride(1) == 1, (residual.shape, residual.stride())
    r = residual if residual is not None else y
    nw, eps = norm if norm is not None else (w, 0.0)
    bm = max(1, triton.next_power_of_2(M))
    bk = min(512 // bm, triton.next_power_of_2(K))  # [BM, BN, BK] fp32 products: <= 64 registers a thread
    bn = 8 if swiglu is not None else 16  # rows of W per program: N / BN programs over the SMs
    if M:
        _gemv_kernel[(triton.cdiv(N, bn),)](x, x.stride(0), w, w.stride(0), y, y.stride(0), r, r.stride(0), nw, M, N,
                                           eps, K=K, BM=bm, BN=bn, BK=bk, NORM=norm is not None,
                                           RESID=residual is not None, SWIGLU=swiglu is not None, num_warps=4)
    return y
