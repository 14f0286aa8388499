"""SSC's prefill readout grouped by checkpoint (Triton), for chunks that see many more memories than k.

triton.py's tile readout multiplies, per tile of up to 64 tokens, every checkpoint that some token of
the tile chose: when the tokens see N >> k memories, that union grows towards N and so does the cost.
Here every (token, head, choice) entry is sorted by (chunk, head, table entry), the entries of one
checkpoint are cut into tiles of BT, and a tile multiplies its tokens' queries with that checkpoint
only (read once per tile, bf16 tensor-core dot on the GPU), adding gamma * (C q) into an fp32
accumulator with atomics: the cost follows tokens x k, whatever N. The sort and the tile table are
torch ops on the device sized by host-known bounds, so nothing waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcserve.kernels.prefill.varlen import VarlenBatch, to_device


@triton.jit
def _grouped_kernel(tile_group, tile_first, group_end, tok, gam, q, table, ckpt, acc,
                    n_groups, W, scale,
                    s_qt, s_qh, s_cb, s_ch, s_cv, s_at, s_ah,
                    H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
    j = tl.program_id(0)
    gv = tl.program_id(1)
    vb = tl.program_id(2)
    grp = tl.load(tile_group + j)
    if grp < n_groups:  # tiles past the last group (the grid is an upper bound) do nothing
        first = tl.load(tile_first + j)
        end = tl.load(group_end + grp)
        seq = grp // (H * W)
        h = (grp // W) % H
        hv = h * G + gv
        blk = tl.load(table + seq * W + grp % W)
        r = first + tl.arange(0, BT)
        rm = r < end
        t = tl.load(tok + r, mask=rm, other=0)
        ga = tl.load(gam + r, mask=rm, other=0.0)
        vv = vb * BV + tl.arange(0, BV)
        vm = vv < DV
        part = tl.zeros([BT, BV], dtype=tl.float32)
        for k0 in range(0, DK, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < DK
            qt = tl.load(q + t[:, None] * s_qt + h * s_qh + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            ct = tl.load(ckpt + blk * s_cb + hv * s_ch + vv[:, None] * s_cv + kk[None, :],
                         mask=vm[:, None] & km[None, :], other=0.0)
            if IEEE:
                part += tl.dot(qt.to(tl.float32), tl.trans(ct.to(tl.float32)), input_precision="ieee")
            else:
                part += tl.dot(qt.to(ct.dtype), tl.trans(ct))
        tl.atomic_add(acc + t[:, None] * s_at + hv * s_ah + vv[None, :], (ga * scale)[:, None] * part,
                      mask=rm[:, None] & vm[None, :])


def use_grouped(batch: VarlenBatch, aggregation: str) -> bool:
    """Grouping pays where tokens see many more memories than they choose (SSC only: the others read all)."""
    return aggregation == "ssc" and max((p.segment for p in batch.pieces), default=0) > 2 * batch.max_top_k


def readout_grouped(o: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor, g_on: torch.Tensor, batch: VarlenBatch,
                    ckpt_pool: torch.Tensor, ieee: bool, block_t: int = 64) -> torch.Tensor:
    """y [T, HV, dv] in o's dtype = g_on o + sum of the chosen gamma (C q scaled), from the router's gamma
    [T, H, W] (zero where not chosen, every column written), g_on [T, H], q [T, H, dk] in the dot's dtype."""
    T, H, W = gamma.shape
    HV, dv, dk = ckpt_pool.shape[1:]
    K = batch.max_top_k
    n_groups = batch.num_chunks * H * W
    tok_seq = batch.memo("tok_chunk", lambda: to_device(torch.repeat_interleave(
        torch.arange(batch.num_chunks), torch.tensor([c.length for c in batch.chunks])), batch.device))
    val, col = gamma.topk(K, dim=-1)  # every chosen entry: a token chooses at most its k (<= K)
    heads = torch.arange(H, device=o.device)
    key = torch.where(val > 0, (tok_seq[:, None, None] * H + heads[None, :, None]) * W + col, n_groups).flatten()
    order = torch.argsort(key)
    tok = torch.div(order, H * K, rounding_mode="floor")
    gam = val.flatten()[order]
    # (bincount would read the largest key back to the host to size its output)
    counts = torch.zeros(n_groups + 1, dtype=torch.long, device=o.device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:n_groups]
    end = torch.cumsum(counts, 0)
    tiles = torch.div(counts + block_t - 1, block_t, rounding_mode="floor")
    tiles_end = torch.cumsum(tiles, 0)
    bound = triton.cdiv(T * H * K, block_t) + n_groups  # at most one partial tile per group
    jj = torch.arange(bound, device=o.device)
    tile_group = torch.searchsorted(tiles_end, jj, right=True)
    g = tile_group.clamp_max(n_groups - 1)
    tile_first = end[g] - counts[g] + (jj - (tiles_end[g] - tiles[g])) * block_t
    acc = torch.zeros(T, HV, dv, dtype=torch.float32, device=o.device)
    bk = min(32 if ieee else 64, triton.next_power_of_2(dk))
    bv = min(64, triton.next_power_of_2(dv))
    _grouped_kernel[(bound, HV // H, triton.cdiv(dv, bv))](
        tile_group, tile_first, end, tok, gam, q, batch.table.contiguous(), ckpt_pool, acc,
        n_groups, W, dk**-0.5,
        q.stride(0), q.stride(1), ckpt_pool.stride(0), ckpt_pool.stride(1), ckpt_pool.stride(2),
        acc.stride(0), acc.stride(1),
        H=H, G=HV // H, DK=dk, DV=dv, BK=bk, BV=bv, BT=block_t, IEEE=ieee, num_warps=8 if ieee else 4)
    G = HV // H
    return (g_on.repeat_interleave(G, dim=1)[..., None] * o.float() + acc).to(o.dtype)
