"""batched.py's segment-key sums in Triton: the sum of each piece's keys, in fp32, one program per
(piece, head) walking the piece's rows. torch's `index_add_` does one atomic add per element, every
row of a piece onto the same addresses, and needs k in the sums' dtype (a copy when k is bf16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcserve.kernels.prefill.varlen import VarlenBatch, to_device


@triton.jit
def _piece_sums_kernel(k, s_kt, s_kh, pieces, n_pieces, out, s_op, s_oh,
                       DK: tl.constexpr, MAXLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(pieces + p).to(tl.int64)
    n = tl.load(pieces + n_pieces + p)
    d = tl.arange(0, BK)
    dm = d < DK
    acc = tl.zeros([BK], dtype=tl.float32)
    for r0 in range(0, MAXLEN, BT):  # constexpr bound: a piece has at most a segment's tokens
        rows = r0 + tl.arange(0, BT)
        m = (rows < n)[:, None] & dm[None, :]
        x = tl.load(k + (tok0 + rows)[:, None] * s_kt + h * s_kh + d[None, :], mask=m, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out + p * s_op + h * s_oh + d, acc, mask=dm)


def piece_sums_triton(k: torch.Tensor, batch: VarlenBatch) -> torch.Tensor:
    """k [T, H, dk] (any float dtype, last dim contiguous) -> [pieces, H, dk] fp32: each piece's key sum."""
    T, H, dk = k.shape
    assert k.stride(2) == 1 and T == batch.num_tokens, (k.shape, k.stride(), batch.num_tokens)
    pieces = batch.memo("triton_pieces", lambda: to_device(torch.tensor(
        [[p.tok0 for p in batch.pieces], [p.length for p in batch.pieces]], dtype=torch.int32), batch.device))
    n = len(batch.pieces)
    out = torch.empty(n, H, dk, dtype=torch.float32, device=k.device)
    bk = triton.next_power_of_2(dk)
    bt = max(1, min(64, 8192 // bk, triton.next_power_of_2(batch.segment_size)))
    _piece_sums_kernel[(n, H)](k, k.stride(0), k.stride(1), pieces, n, out, out.stride(0), out.stride(1),
                               DK=dk, MAXLEN=batch.segment_size, BT=bt, BK=bk, num_warps=8 if bk >= 128 else 4)
    return out
