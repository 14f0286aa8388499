"""The packed prefill's short causal conv in Triton, fused with what follows it: SiLU, and the L2 norm
of every q and k head (kernels/gates.py's `l2norm`), for all chunks of a step in one pass.

Input is the projection output itself (`raw` [T, 2 kd + vd], rows may be strided: columns of the
fused input projection) and each chunk's conv state before it (`prev` [n, conv_dim, W-1]): a tap
that falls before its chunk's first token reads the state, so no extended copy of the input is made.
Per (block of tokens, column block) program: a q head, a k head, or a block of v columns.
Out: q, k [T, H, dk] normalised and v [T, HV, dv], contiguous, in raw's dtype (what the core takes),
and with `copy32` q, k also in fp32 (the router's and the segment keys' precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_tile(raw, s_r, prev, s_pn, s_pd, w, b, D, t, tm, seq, off, col, dm, W: tl.constexpr, BT: tl.constexpr,
               BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """silu(conv) [BT, BD] fp32 (rounded through raw's dtype) of tokens t at columns col."""
    m = tm[:, None] & dm[None, :]
    t64 = t.to(tl.int64)
    # only a block with a chunk's first W-1 tokens reads conv states: the others skip those loads
    at_start = tl.min(tl.where(tm, off, W - 1), axis=0) < W - 1
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        src = off - (W - 1) + j  # the tap's input, as an offset inside the chunk (< 0: the conv state)
        inside = (src >= 0)[:, None]
        x = tl.load(raw + (t64 - (W - 1) + j)[:, None] * s_r + col[None, :], mask=m & inside, other=0.0)
        x = x.to(tl.float32)
        if at_start:  # exactly one of the two loads is unmasked, the other adds 0
            x += tl.load(prev + seq[:, None] * s_pn + col[None, :] * s_pd + (W - 1 + src)[:, None],
                         mask=m & ~inside, other=0.0).to(tl.float32)
        acc += x * tl.load(w + j * D + col, mask=dm, other=0.0)[None, :]  # w [W, D]: a tap's row contiguous
    if HAS_BIAS:
        acc += tl.load(b + col, mask=dm, other=0.0)[None, :]
    return (acc / (1.0 + tl.exp(-acc))).to(raw.dtype.element_ty).to(tl.float32)  # the model's dtype


@triton.jit
def _conv_heads_kernel(raw, s_r, prev, s_pn, s_pd, tok_seq, tok_off, w, b, q, k, v, q32, k32, T, KD, VD,
                       W: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                       HAS_BIAS: tl.constexpr, COPY32: tl.constexpr):
    """Program (token block, c): c < H q head c, c < 2 H k head c - H, else v columns (c - 2 H) * BD ..
    Each branch computes its own column offsets (no value shared between them), so that the compiler
    keeps their contiguity and the loads and stores stay vectorised."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1)
    tm = t < T
    seq = tl.load(tok_seq + t, mask=tm, other=0).to(tl.int64)
    off = tl.load(tok_off + t, mask=tm, other=0)
    d = tl.arange(0, BD)
    D = 2 * KD + VD
    t64 = t.to(tl.int64)
    if c < 2 * H:  # one q or k head: columns c * DK .., L2-normalised over the head in fp32
        dm = d < DK
        y = _conv_tile(raw, s_r, prev, s_pn, s_pd, w, b, D, t, tm, seq, off, c * DK + d, dm, W, BT, BD, HAS_BIAS)
        n = y * (1.0 / tl.sqrt(tl.sum(y * y, axis=1) + 1e-6))[:, None]
        m = tm[:, None] & dm[None, :]
        dst = t64[:, None] * (H * DK) + (c % H) * DK + d[None, :]
        if c < H:
            tl.store(q + dst, n.to(q.dtype.element_ty), mask=m)
            if COPY32:
                tl.store(q32 + dst, n, mask=m)
        else:
            tl.store(k + dst, n.to(k.dtype.element_ty), mask=m)
            if COPY32:
                tl.store(k32 + dst, n, mask=m)
    else:  # a block of v columns
        vc = (c - 2 * H) * BD + d
        dm = vc < VD
        y = _conv_tile(raw, s_r, prev, s_pn, s_pd, w, b, D, t, tm, seq, off, 2 * KD + vc, dm, W, BT, BD, HAS_BIAS)
        tl.store(v + t64[:, None] * VD + vc[None, :], y.to(v.dtype.element_ty), mask=tm[:, None] & dm[None, :])


def launch_config(head_dim: int) -> dict[str, int]:
    """Tokens per program, columns per program (one head; v in blocks as wide) and warps: 32 tokens of
    a 256-wide head per 8 warps (32 fp32 per thread), each tap one 16-byte load per 8 columns.
    tests/kernels/test_triton_compile.py compiles these for sm_90 and checks that nothing spills."""
    bd = triton.next_power_of_2(head_dim)
    return dict(BT=max(4, min(32, 8192 // bd)), BD=bd, num_warps=8 if bd >= 128 else 4)


def conv_heads_triton(raw: torch.Tensor, prev: torch.Tensor, tok_seq: torch.Tensor, tok_off: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, head_dim: int,
                      copy32: bool) -> tuple[torch.Tensor, ...]:
    """raw [T, 2 kd + vd] (last dim contiguous), prev [n, conv_dim, W-1] each chunk's conv state,
    tok_seq / tok_off [T] int32 each token's chunk and its offset in it, weight [conv_dim, W], bias
    [conv_dim] or None -> (q, k [T, H, dk], v [T, vd], q32, k32): q32, k32 fp32 copies with `copy32`,
    else q and k themselves."""
    T, D = raw.shape
    H, DK = num_heads, head_dim
    KD = H * DK
    VD = D - 2 * KD
    W = weight.shape[1]
    assert raw.stride(1) == 1 and weight.shape[0] == D and prev.shape[1:] == (D, W - 1), (raw.shape, weight.shape,
                                                                                          prev.shape)
    assert prev.stride(2) == 1 and tok_seq.shape == tok_off.shape == (T,), (prev.stride(), tok_seq.shape)
    q = torch.empty(T, H, DK, dtype=raw.dtype, device=raw.device)
    k = torch.empty_like(q)
    v = torch.empty(T, VD, dtype=raw.dtype, device=raw.device)
    copy32 = copy32 and raw.dtype != torch.float32
    q32 = torch.empty(T, H, DK, dtype=torch.float32, device=raw.device) if copy32 else q
    k32 = torch.empty_like(q32) if copy32 else k
    if T == 0:
        return q, k, v, q32, k32
    w = weight.float().t().contiguous()  # [W, D]
    cfg = launch_config(DK)
    bt, bd = cfg["BT"], cfg["BD"]
    grid = (triton.cdiv(T, bt), 2 * H + triton.cdiv(VD, bd))
    _conv_heads_kernel[grid](raw, raw.stride(0), prev, prev.stride(0), prev.stride(1), tok_seq, tok_off, w,
                             bias.float().contiguous() if bias is not None else w, q, k, v, q32, k32, T, KD, VD,
                             W=W, H=H, DK=DK, BT=bt, BD=bd, HAS_BIAS=bias is not None, COPY32=copy32,
                             num_warps=cfg["num_warps"])
    return q, k, v, q32, k32


@triton.jit
def _keep_windows_kernel(raw, s_r, prev, s_pn, s_pd, win_tok, win_row, win_col, win_seq, slots, blocks, st, s_sn,
                         s_sd, ck, s_cn, s_cd, n, D, W1: tl.constexpr, BD: tl.constexpr):
    """Window m (< n: chunk m's last W-1 inputs, into its slot; else a boundary's, into its block),
    columns of one program: each entry a token row of raw or a column of the chunk's state before it."""
    m = tl.program_id(0)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = col < D
    seq = tl.load(win_seq + m)
    for j in tl.static_range(W1):
        tok = tl.load(win_tok + m * W1 + j) != 0
        xr = tl.load(raw + tl.load(win_row + m * W1 + j) * s_r + col, mask=cm & tok, other=0.0)
        xp = tl.load(prev + seq * s_pn + col * s_pd + tl.load(win_col + m * W1 + j), mask=cm & ~tok, other=0.0)
        x = tl.where(tok, xr, xp.to(raw.dtype.element_ty))  # the window in raw's dtype, as the torch path
        if m < n:  # the pools may differ in dtype: a store per branch
            tl.store(st + tl.load(slots + m) * s_sn + col * s_sd + j, x.to(st.dtype.element_ty), mask=cm)
        else:
            tl.store(ck + tl.load(blocks + m - n) * s_cn + col * s_cd + j, x.to(ck.dtype.element_ty), mask=cm)


def keep_windows_triton(raw: torch.Tensor, prev: torch.Tensor, win_tok: torch.Tensor, win_row: torch.Tensor,
                        win_col: torch.Tensor, win_seq: torch.Tensor, slots: torch.Tensor, blocks: torch.Tensor,
                        slot_conv: torch.Tensor, block_conv: torch.Tensor) -> None:
    """The conv states to keep, in one launch: windows [M, W-1] of entries (win_tok: raw's row win_row,
    else column win_col of prev[win_seq]; batched_prefill's `_ConvLayout`), window m < n = len(slots)
    into slot_conv[slots[m]], the others into block_conv[blocks[m - n]]. raw [T, D] (last dim
    contiguous), prev [n, D, W-1], slot_conv [slots, D, W-1], block_conv [blocks, D, W-1] (strided
    views of the pools, last dim contiguous)."""
    M, W1 = win_tok.shape
    D = raw.shape[1]
    n = slots.numel()
    assert raw.stride(1) == prev.stride(2) == slot_conv.stride(2) == block_conv.stride(2) == 1, (
        raw.stride(), prev.stride(), slot_conv.stride(), block_conv.stride())
    assert M == n + blocks.numel() and prev.shape[1:] == slot_conv.shape[1:] == block_conv.shape[1:] == (D, W1)
    if M == 0 or W1 == 0:
        return
    bd = min(1024, triton.next_power_of_2(D))
    _keep_windows_kernel[(M, triton.cdiv(D, bd))](
        raw, raw.stride(0), prev, prev.stride(0), prev.stride(1), win_tok, win_row, win_col, win_seq, slots,
        blocks, slot_conv, slot_conv.stride(0), slot_conv.stride(1), block_conv, block_conv.stride(0),
        block_conv.stride(1), n, D, W1=W1, BD=bd, num_warps=4)
