"""batched.py's `segment_keys` in Triton: each piece's key sum in fp32, one program per (piece, head)
walking the piece's rows, and in the same program what the sum is for: the running key sum before
the chunk added where the chunk continues a segment, the segment key (sum / C) into the boundary's
block, the slot's new running sum (0 after a boundary). torch's `index_add_` does one atomic add per
element, every row of a piece onto the same addresses, needs k in the sums' dtype (a copy when k is
bf16), and the bookkeeping after it was a dozen small gathers, wheres and index_puts per layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcserve.kernels.prefill.varlen import VarlenBatch, to_device


@triton.jit
def _segment_keys_kernel(k, s_kt, s_kh, meta, n_pieces, key_sum0, s_0n, s_0h, slot_keys, s_sn, s_sh, ckpt_keys,
                         s_cb, s_ch, C, DK: tl.constexpr, MAXLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(meta + p).to(tl.int64)
    n = tl.load(meta + n_pieces + p)
    seq = tl.load(meta + 2 * n_pieces + p).to(tl.int64)
    flags = tl.load(meta + 3 * n_pieces + p)  # 1: add the running sum before the chunk; 2: the chunk's last piece
    block = tl.load(meta + 4 * n_pieces + p).to(tl.int64)
    slot = tl.load(meta + 5 * n_pieces + p).to(tl.int64)
    d = tl.arange(0, BK)
    dm = d < DK
    acc = tl.zeros([BK], dtype=tl.float32)
    for r0 in range(0, MAXLEN, BT):  # constexpr bound: a piece has at most a segment's tokens
        rows = r0 + tl.arange(0, BT)
        m = (rows < n)[:, None] & dm[None, :]
        x = tl.load(k + (tok0 + rows)[:, None] * s_kt + h * s_kh + d[None, :], mask=m, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    if (flags & 1) != 0:
        acc += tl.load(key_sum0 + seq * s_0n + h * s_0h + d, mask=dm, other=0.0)
    if block >= 0:
        tl.store(ckpt_keys + block * s_cb + h * s_ch + d, (acc / C).to(ckpt_keys.dtype.element_ty), mask=dm)
    if (flags & 2) != 0:
        keep = tl.where(block >= 0, 0.0, acc)
        tl.store(slot_keys + slot * s_sn + h * s_sh + d, keep.to(slot_keys.dtype.element_ty), mask=dm)


def _meta(batch: VarlenBatch) -> torch.Tensor:
    """[6, pieces] int32: first row, rows, chunk, flags, write block (-1: none), the chunk's slot."""
    C = batch.segment_size
    last = {p.seq: j for j, p in enumerate(batch.pieces)}
    cols = [(p.tok0, p.length, p.seq,
             int(p.first and batch.chunks[p.seq].start_pos % C != 0) | (2 if last[p.seq] == j else 0),
             p.write_block, batch.chunks[p.seq].slot) for j, p in enumerate(batch.pieces)]
    return to_device(torch.tensor(cols, dtype=torch.int32).reshape(-1, 6).t().contiguous(), batch.device)


def segment_keys_triton(k: torch.Tensor, batch: VarlenBatch, key_sum_pool: torch.Tensor,
                        ckpt_key_pool: torch.Tensor) -> torch.Tensor:
    """batched.py's `segment_keys` contract: k [T, H, dk] (any float dtype, last dim contiguous);
    key_sum_pool [slots, H, dk] updated, ckpt_key_pool [blocks, H, dk] written at the boundaries'
    blocks (last dims contiguous, views of the pools). Returns each chunk's running key sum before
    the chunk [n, H, dk] (a copy)."""
    T, H, dk = k.shape
    assert k.stride(2) == 1 and T == batch.num_tokens, (k.shape, k.stride(), batch.num_tokens)
    assert key_sum_pool.stride(2) == ckpt_key_pool.stride(2) == 1, (key_sum_pool.stride(), ckpt_key_pool.stride())
    key_sum0 = key_sum_pool[batch.slots]  # a copy, taken before the kernel writes the slots
    meta = batch.memo("triton_segment_keys", lambda: _meta(batch))
    n = len(batch.pieces)
    if n == 0:
        return key_sum0
    bk = triton.next_power_of_2(dk)
    bt = max(1, min(64, 8192 // bk, triton.next_power_of_2(batch.segment_size)))
    _segment_keys_kernel[(n, H)](k, k.stride(0), k.stride(1), meta, n, key_sum0, key_sum0.stride(0),
                                 key_sum0.stride(1), key_sum_pool, key_sum_pool.stride(0), key_sum_pool.stride(1),
                                 ckpt_key_pool, ckpt_key_pool.stride(0), ckpt_key_pool.stride(1), batch.segment_size,
                                 DK=dk, MAXLEN=batch.segment_size, BT=bt, BK=bk, num_warps=8 if bk >= 128 else 4)
    return key_sum0
