"""Fused Triton row kernels for the glue of a decode step on CUDA (one token per row), beside the
layer core: the gather of a step's rows from the persistent batch (one launch instead of a dozen
indexing ops), the short causal conv step (reads and updates the conv state in its slot, in place,
and writes it to the row's checkpoint block at a segment boundary), residual add + RMSNorm, and
SwiGLU over a fused gate|up projection row.

Each computes what its torch reference computes (server/model/layers.py's modules: fp32 inside, the
input's dtype out; the residual sum is rounded to the stream's dtype before it is normalised, as
`x = x + d` then `norm(x)` does; `DeviceBatch.step_inputs` for the gather), in one pass instead of
eager torch's five or six, so that a batch-1 step is not a chain of tiny launches. All shapes are
fixed by the batch: the kernels capture in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_step_kernel(x, s_x, state, s_sb, slots, w, bias, y, s_y, D, ckpt, s_cb, writes,
                      W1: tl.constexpr, WP: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_CKPT: tl.constexpr):
    """One (row, BD channels) per program: y = silu(sum_j win_j w_j (+ bias)), win = [state, x];
    the state becomes win[1:], and so does the row's checkpoint block when it has one (writes >= 0:
    a segment boundary). Rows with slot < 0 (padding) write a zero output, no state, no block.
    The window is one [BD, WP] tile (WP = W1 + 1 rounded up to a power of two): each channel's W1
    state entries are adjacent, so the tile's loads and stores cover one contiguous run."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    j = tl.arange(0, WP)
    m = d < D
    slot = tl.load(slots + row).to(tl.int64)
    if slot < 0:
        tl.store(y + row * s_y + d, tl.zeros([BD], dtype=tl.float32).to(y.dtype.element_ty), mask=m)
        return
    wb = tl.load(writes + row).to(tl.int64) if HAS_CKPT else -1
    xv = tl.load(x + row * s_x + d, mask=m, other=0.0)
    st = state + slot * s_sb + d[:, None] * W1 + j[None, :]
    in_state = m[:, None] & (j < W1)[None, :]
    old = tl.load(st, mask=in_state, other=0.0)  # [BD, WP]: state[0..W1-1], the newest last
    win = tl.where((j == W1)[None, :], xv[:, None].to(old.dtype), old)
    wt = tl.load(w + d[:, None] * (W1 + 1) + j[None, :], mask=m[:, None] & (j <= W1)[None, :], other=0.0)
    acc = tl.sum(win.to(tl.float32) * wt.to(tl.float32), axis=1)
    # the new state: entry i takes old entry i + 1, the last takes x
    nxt = tl.load(st + 1, mask=m[:, None] & (j < W1 - 1)[None, :], other=0.0)
    new = tl.where((j == W1 - 1)[None, :], xv[:, None].to(old.dtype), nxt)
    tl.store(st, new, mask=in_state)
    if HAS_CKPT:
        cb = ckpt + tl.maximum(wb, 0) * s_cb + d[:, None] * W1 + j[None, :]
        tl.store(cb, new.to(ckpt.dtype.element_ty), mask=in_state & (wb >= 0))
    if HAS_BIAS:
        acc += tl.load(bias + d, mask=m, other=0.0).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(y + row * s_y + d, out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _add_norm_kernel(x, dx, w, xo, h, s_x, s_d, s_xo, s_h, D, eps, BD: tl.constexpr, ADD: tl.constexpr):
    """One row per program: s = x + dx (dx and the sum rounded to x's dtype) -> xo; h = RMSNorm(s) * w."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    m = d < D
    xv = tl.load(x + row * s_x + d, mask=m, other=0.0)
    if ADD:
        # dx rounded to x's dtype first, as a matmul in that dtype returns it (a split-K matmul's
        # partial sums arrive in fp32)
        dv = tl.load(dx + row * s_d + d, mask=m, other=0.0).to(xv.dtype).to(tl.float32)
        xv = (xv.to(tl.float32) + dv).to(xv.dtype)
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


@triton.jit
def _gather_kernel(order, positions, tokens, slots, top_k, table, s_t, utility,
                   tok_o, pos_o, slot_o, k_o, table_o, write_o, width, C, last, scratch,
                   BW: tl.constexpr, HAS_UTIL: tl.constexpr):
    """One step row per program: idx = order[i]; its token, position, slot, k and the first `width`
    entries of its table copied out; its write block (the entry of the segment its token ends, -1
    when the token ends none); its position advanced in place (not the padding row's, slot < 0: it
    appears many times); the utility of its write block zeroed (the scratch block's when none)."""
    i = tl.program_id(0).to(tl.int64)
    idx = tl.load(order + i)
    pos = tl.load(positions + idx)
    slot = tl.load(slots + idx)
    tl.store(tok_o + i, tl.load(tokens + idx))
    tl.store(pos_o + i, pos)
    tl.store(slot_o + i, slot)
    tl.store(k_o + i, tl.load(top_k + idx))
    e = tl.arange(0, BW)
    ent = tl.load(table + idx * s_t + e, mask=e < width, other=-1)
    tl.store(table_o + i * width + e, ent, mask=e < width)
    wb = tl.load(table + idx * s_t + tl.minimum(pos // C, last))
    wb = tl.where(pos % C == C - 1, wb, -1)
    tl.store(write_o + i, wb)
    if slot >= 0:
        tl.store(positions + idx, pos + 1)
    if HAS_UTIL:
        tl.store(utility + tl.where(wb >= 0, wb, scratch), 0.0)


def gather_rows(order: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor,
                top_k: torch.Tensor, table: torch.Tensor, rows: int, width: int, segment_size: int,
                utility: torch.Tensor | None, scratch: int) -> tuple[torch.Tensor, ...]:
    """A decode step's inputs from a persistent batch (int64 tensors: per batch row `positions`,
    `tokens`, `slots`, `top_k`, `table` [rows + 1, W]; `order` the step's batch rows) in one launch:
    (tokens, positions, slots, top_k, table [rows, width], write_blocks) of order[:rows], with the
    side effects `_gather_kernel` lists. width <= W."""
    dev = order.device
    width = min(width, table.shape[1])  # a graph's width bucket may exceed the table: as table[:, :width]
    outs = [torch.empty(rows, dtype=torch.int64, device=dev) for _ in range(4)]
    tab = torch.empty(rows, width, dtype=torch.int64, device=dev)
    write = torch.empty(rows, dtype=torch.int64, device=dev)
    assert table.stride(1) == 1, table.stride()
    if rows:
        _gather_kernel[(rows,)](order, positions, tokens, slots, top_k, table, table.stride(0),
                                utility if utility is not None else positions, *outs, tab, write, width,
                                segment_size, table.shape[1] - 1, scratch, BW=triton.next_power_of_2(width),
                                HAS_UTIL=utility is not None)
    return (*outs, tab, write)


def conv_step(x: torch.Tensor, state: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, ckpt: torch.Tensor | None = None,
              write_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, D] (rows may be strided, last dim contiguous), state [slots, D, W-1] one layer's conv pool
    (updated in place through `slots` [B]; rows with slot < 0 are padding), weight [D, W] -> [B, D].
    ckpt [blocks, D, W-1] (one layer's view of the checkpoint pool) with write_blocks [B]: a row with
    a block (>= 0) also writes its new conv state there."""
    B, D = x.shape
    W1 = state.shape[2]
    assert x.stride(1) == 1 and state.stride(2) == 1 and state.stride(1) == W1, (x.stride(), state.stride())
    assert weight.shape == (D, W1 + 1) and weight.is_contiguous(), weight.shape
    has_ckpt = ckpt is not None
    if has_ckpt:
        assert write_blocks is not None and write_blocks.shape == (B,), write_blocks
        assert ckpt.shape[1:] == state.shape[1:] and ckpt.stride(2) == 1 and ckpt.stride(1) == W1, ckpt.stride()
    y = torch.empty(B, D, dtype=x.dtype, device=x.device)
    # 256 channels a program: B x D / 256 programs (1,536 at B=64 for the 1.3b preset) hide the
    # slot -> state load chain better than 1,024 did (7.4 us a layer at B=64 on the H200)
    bd = min(256, triton.next_power_of_2(D))
    if B:
        _conv_step_kernel[(B, triton.cdiv(D, bd))](
            x, x.stride(0), state, state.stride(0), slots, weight, bias if bias is not None else weight, y, y.stride(0),
            D, ckpt if has_ckpt else state, ckpt.stride(0) if has_ckpt else 0,
            write_blocks if has_ckpt else slots, W1=W1, WP=triton.next_power_of_2(W1 + 1), BD=bd,
            HAS_BIAS=bias is not None, HAS_CKPT=has_ckpt)
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
