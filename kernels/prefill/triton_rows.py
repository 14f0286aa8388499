"""Row copies between pools by index in one Triton pass: dst[dst_rows[i]] = src[src_rows[i]], cast to
dst's dtype. The packed prefill's state and checkpoint writes are whole rows of 0.8 M elements (HV x
dv x dk at the 1.3b preset): torch's `pool[idx] = x[idx2]` is a gather into a temporary and then an
index_put (one index computation per element, 4 elements per thread), so the checkpoints went through
memory twice; here every row moves once, 16-byte vectors at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program (16 per thread at 8 warps)


@triton.jit
def _copy_rows_kernel(dst, dst_rows, s_d, src, src_rows, s_s, N, BLOCK: tl.constexpr, SRC_ROWS: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    rd = tl.load(dst_rows + i).to(tl.int64)
    if SRC_ROWS:
        rs = tl.load(src_rows + i).to(tl.int64)
    else:
        rs = i.to(tl.int64)
    x = tl.load(src + rs * s_s + cols, mask=m)
    tl.store(dst + rd * s_d + cols, x.to(dst.dtype.element_ty), mask=m)


def _rows_contiguous(x: torch.Tensor) -> bool:
    return x.as_strided(x.shape[1:], x.stride()[1:]).is_contiguous()


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor | None = None
              ) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] (src[i] without src_rows) for every i, in dst's dtype.
    dst [R, ...], src [S, ...] with equal row shapes, each row contiguous (the first dim's stride any:
    a layer's view of a pool); dst_rows distinct and in range (as the prefill's layouts make them)."""
    n = dst_rows.numel()
    assert dst.shape[1:] == src.shape[1:] and _rows_contiguous(dst) and _rows_contiguous(src), (
        dst.shape, dst.stride(), src.shape, src.stride())
    assert src_rows is None and src.shape[0] == n or src_rows is not None and src_rows.numel() == n, (
        n, src.shape, None if src_rows is None else src_rows.shape)
    if n == 0:
        return
    N = dst[0].numel()
    _copy_rows_kernel[(n, triton.cdiv(N, BLOCK))](dst, dst_rows, dst.stride(0), src,
                                                  dst_rows if src_rows is None else src_rows, src.stride(0), N,
                                                  BLOCK=BLOCK, SRC_ROWS=src_rows is not None, num_warps=8)
