"""The MC readout of a packed prefill batch in Triton: packed.py's `readout_rounds` on the GPU.

Tokens are cut into tiles of at most BT rows inside one segment piece (varlen.py), so all rows of a
tile see the same memories: table[seq, :segment]. Two kernels per layer:

1. `_router_kernel`, grid (tiles, H): the online score (the running mean of the segment's keys up to
   and including each row: the slot's sum where the chunk continues a segment, earlier tiles of the
   piece, the tile's own cumsum), scores against the segment keys in the key pool (those of this
   step's boundaries included), SSC's top-k (ties to the lower index, as kernels/router.py), softmax
   with the online score. Writes gamma [T, H, W] (0 where not chosen) and the online weight [T, H],
   and adds each table entry's router weight into `weights` [n, W] (atomics).
2. `_readout_kernel`, grid (tiles, HV, dv / BV): y = gamma_online * o + sum over the memories some row
   of the tile chose of gamma * (C_i q), each chosen checkpoint read once per tile straight from the
   pool (bf16 on the GPU: a bf16 tensor-core dot with fp32 accumulation), never copied. Where SSC's
   tokens see many more memories than k (that union then grows with them), triton_grouped.py's
   readout instead, grouped by checkpoint.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.triton_grouped import readout_grouped, use_grouped
from mcserve.kernels.prefill.varlen import VarlenBatch, to_device

_AGG = {"residual": 0, "grm": 1, "soup": 1, "ssc": 2}  # soup equals grm for linear memory


@triton.jit
def _router_kernel(
    tiles, u, k, key_sum0, table, top_k, key_pool, gamma, g_on, weights,
    n_tiles, W, C,
    s_ut, s_uh, s_kt, s_kh, s_sn, s_sh, s_pb, s_ph, s_gt, s_gh, s_ot,
    DK: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, NMAX: tl.constexpr, AGG: tl.constexpr,
    KMAX: tl.constexpr, PREV: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(tiles + i)
    ln = tl.load(tiles + n_tiles + i)
    seq = tl.load(tiles + 2 * n_tiles + i).to(tl.int64)
    nmem = tl.load(tiles + 3 * n_tiles + i)
    p0 = tl.load(tiles + 4 * n_tiles + i)
    pos0 = tl.load(tiles + 5 * n_tiles + i)
    cont = tl.load(tiles + 6 * n_tiles + i)
    rows = tl.arange(0, BT)
    rmask = rows < ln
    tok = (tok0 + rows).to(tl.int64)
    cols = tl.arange(0, NMAX)
    blk = tl.load(table + seq * W + cols, mask=cols < nmem, other=-1)
    cvalid = (cols < nmem) & (blk >= 0)

    r_on = tl.zeros([BT], dtype=tl.float32)
    r = tl.zeros([BT, NMAX], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < DK
        prefix = tl.zeros([BK], dtype=tl.float32)
        if cont != 0:
            prefix += tl.load(key_sum0 + seq * s_sn + h * s_sh + kk, mask=kmask, other=0.0)
        for j in tl.static_range(PREV):  # earlier (full) tiles of the same piece: masked, not branched,
            t0 = p0 + j * BT  # so that their loads are all in flight at once (a tile past tok0 adds 0)
            tt = (t0 + rows).to(tl.int64)
            prefix += tl.sum(tl.load(k + tt[:, None] * s_kt + h * s_kh + kk[None, :],
                                     mask=kmask[None, :] & (t0 < tok0), other=0.0).to(tl.float32), axis=0)
        m2 = rmask[:, None] & kmask[None, :]
        kt = tl.load(k + tok[:, None] * s_kt + h * s_kh + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        ut = tl.load(u + tok[:, None] * s_ut + h * s_uh + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        r_on += tl.sum(ut * (prefix[None, :] + tl.cumsum(kt, axis=0)), axis=1)
        keys = tl.load(key_pool + blk[:, None] * s_pb + h * s_ph + kk[None, :],
                       mask=cvalid[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        r += tl.dot(ut, tl.trans(keys), input_precision="ieee")
    r_on = r_on / ((pos0 % C) + rows + 1).to(tl.float32)

    neg = float("-inf")
    if AGG == 2:
        kq = tl.load(top_k + seq)
        sel = tl.zeros([BT, NMAX], dtype=tl.int32)
        work = tl.where(cvalid[None, :], r, neg)
        for j in range(0, KMAX):  # k rounds of "take the best left, the lowest index among equals"
            best = tl.max(work, axis=1)
            hit = (work == best[:, None]) & (best[:, None] > neg)
            pick = (cols[None, :] == tl.min(tl.where(hit, cols[None, :], NMAX), axis=1)[:, None]) & (j < kq)
            sel = tl.where(pick, 1, sel)
            work = tl.where(pick, neg, work)
        chosen = sel != 0
    else:
        chosen = cvalid[None, :] & rmask[:, None]
    if AGG == 0:
        gam = tl.where(chosen, 1.0, 0.0)
        gon = tl.full([BT], 1.0, dtype=tl.float32)
    else:
        lg = tl.where(chosen, r, neg)
        mx = tl.maximum(tl.max(lg, axis=1), r_on)
        e = tl.exp(lg - mx[:, None])
        eo = tl.exp(r_on - mx)
        z = eo + tl.sum(e, axis=1)
        gam = e / z[:, None]
        gon = eo / z
    gam = tl.where(rmask[:, None], gam, 0.0)
    tl.store(gamma + tok[:, None] * s_gt + h * s_gh + cols[None, :], gam, mask=rmask[:, None] & (cols[None, :] < nmem))
    tl.store(g_on + tok * s_ot + h, gon, mask=rmask)
    if HAS_WEIGHTS:
        tl.atomic_add(weights + seq * W + cols, tl.sum(gam, axis=0), mask=cvalid)


@triton.jit
def _readout_kernel(
    tiles, q, o, gamma, g_on, table, ckpt, y,
    n_tiles, W, scale,
    s_qt, s_qh, s_ot, s_oh, s_gt, s_gh, s_got, s_cb, s_ch, s_cv, s_yt, s_yh,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    NMAX: tl.constexpr, IEEE: tl.constexpr,
):
    i = tl.program_id(0)
    hv = tl.program_id(1)
    vb = tl.program_id(2)
    h = hv // G
    tok0 = tl.load(tiles + i)
    ln = tl.load(tiles + n_tiles + i)
    seq = tl.load(tiles + 2 * n_tiles + i).to(tl.int64)
    nmem = tl.load(tiles + 3 * n_tiles + i)
    rows = tl.arange(0, BT)
    rmask = rows < ln
    tok = (tok0 + rows).to(tl.int64)
    vv = vb * BV + tl.arange(0, BV)
    vmask = vv < DV
    m_out = rmask[:, None] & vmask[None, :]
    gon = tl.load(g_on + tok * s_got + h, mask=rmask, other=0.0)
    o_t = tl.load(o + tok[:, None] * s_ot + hv * s_oh + vv[None, :], mask=m_out, other=0.0).to(tl.float32)
    acc = gon[:, None] * o_t
    for m in range(0, NMAX):  # constexpr bound (the interpreter cannot loop to a loaded value)
        if m < nmem:
            blk = tl.load(table + seq * W + m)
            gcol = tl.load(gamma + tok * s_gt + h * s_gh + m, mask=rmask, other=0.0)
            if (blk >= 0) & (tl.max(gcol, axis=0) > 0):  # only checkpoints some row of the tile chose
                part = tl.zeros([BT, BV], dtype=tl.float32)
                for k0 in range(0, DK, BK):
                    kk = k0 + tl.arange(0, BK)
                    kmask = kk < DK
                    qt = tl.load(q + tok[:, None] * s_qt + h * s_qh + kk[None, :],
                                 mask=rmask[:, None] & kmask[None, :], other=0.0)
                    ct = tl.load(ckpt + blk * s_cb + hv * s_ch + vv[:, None] * s_cv + kk[None, :],
                                 mask=vmask[:, None] & kmask[None, :], other=0.0)
                    if IEEE:
                        part += tl.dot(qt.to(tl.float32), tl.trans(ct.to(tl.float32)), input_precision="ieee")
                    else:
                        part += tl.dot(qt.to(ct.dtype), tl.trans(ct))
                acc += (gcol * scale)[:, None] * part
    tl.store(y + tok[:, None] * s_yt + hv * s_yh + vv[None, :], acc.to(y.dtype.element_ty), mask=m_out)


def _tiles(batch: VarlenBatch, bt: int) -> torch.Tensor:
    """[7, n_tiles] int32 on the device: token start, rows, chunk, memories seen, piece start, position of
    the first row, whether the piece continues the slot's running key sum."""
    C = batch.segment_size
    cols: list[tuple[int, ...]] = []
    for p in batch.pieces:
        cont = int(p.first and p.pos0 % C != 0)
        for t in range(0, p.length, bt):
            cols.append((p.tok0 + t, min(bt, p.length - t), p.seq, p.segment, p.tok0, p.pos0 + t, cont))
    return to_device(torch.tensor(cols, dtype=torch.int32).t().contiguous(), batch.device)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def launch_config(dk: int, dv: int, nmax: int, fp32_dot: bool) -> dict[str, dict[str, int]]:
    """Block sizes and warps of both kernels: rows per tile shrink as the memories grow, so that the
    router's [BT, NMAX] scores stay in registers. tests/kernels/test_triton_compile.py compiles these
    for sm_90 at the served shapes and checks that ptxas spills nothing."""
    bt = max(16, min(64, 4096 // nmax))
    # the router walks dk in BK-wide steps, each a chain of dependent loads: wider steps while the
    # [NMAX, BK] keys tile stays small (the 1.3b preset at 1,100 tokens, NMAX 16: 4 steps of 64 instead of 8 of 32)
    return {"router": dict(BT=bt, BK=64 if nmax <= 16 else 32, num_warps=8),
            "readout": dict(BT=bt, BK=min(32 if fp32_dot else 64, _pow2(dk)), BV=min(64, _pow2(dv)),
                            num_warps=8 if fp32_dot else 4)}


def readout_triton(
    o: torch.Tensor,  # [T, HV, dv] online readout
    q: torch.Tensor,  # [T, H, dk] L2-normalised, not scaled
    u: torch.Tensor,  # [T, H, dk]
    k: torch.Tensor,  # [T, H, dk]
    key_sum0: torch.Tensor,  # [n, H, dk]
    batch: VarlenBatch,
    spec: MCSpec,
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk] (a layer's view), this step's checkpoints written
    ckpt_key_pool: torch.Tensor,  # [blocks, H, dk]
    weights: torch.Tensor | None = None,  # [n, table_width] fp32, += router weight per table entry
    block_t: int | None = None,
    dot_fp32: bool | None = None,
) -> torch.Tensor:
    """packed.py's `readout_rounds` contract; y [T, HV, dv] in o's dtype (what the output norm reads),
    accumulated in fp32.

    block_t: rows per tile (default from the number of memories); dot_fp32: multiply checkpoints in fp32
    (default: only fp32 checkpoints; bf16 ones go through a bf16 tensor-core dot, which Triton's
    interpreter cannot run, so interpreter tests of bf16 pools set it)."""
    T, H, dk = q.shape
    HV, dv = o.shape[1], o.shape[2]
    W = batch.table_width
    assert spec.aggregation in _AGG, spec.aggregation
    assert o.shape[0] == T == batch.num_tokens and HV % H == 0, (o.shape, q.shape, batch.num_tokens)
    assert ckpt_pool.shape[1:] == (HV, dv, dk) and ckpt_key_pool.shape[1:] == (H, dk), (ckpt_pool.shape, q.shape)
    for name, t in (("q", q), ("u", u), ("k", k), ("o", o), ("ckpt_pool", ckpt_pool), ("ckpt_key_pool", ckpt_key_pool)):
        assert t.stride(-1) == 1, f"{name}'s last dimension must be contiguous, strides {t.stride()}"
    assert weights is None or (weights.shape == (batch.num_chunks, W) and weights.dtype == torch.float32
                               and weights.is_contiguous()), None if weights is None else weights.shape
    nmax = _pow2(max((p.segment for p in batch.pieces), default=0))
    ieee = ckpt_pool.dtype == torch.float32 if dot_fp32 is None else dot_fp32
    cfg = launch_config(dk, dv, nmax, ieee)
    bt = block_t or cfg["router"]["BT"]
    tiles = batch.memo(("triton_tiles", bt), lambda: _tiles(batch, bt))
    n_tiles = tiles.shape[1]
    key_sum0 = key_sum0.float().contiguous()
    grouped = use_grouped(batch, spec.aggregation)
    # the grouped readout picks every token's choices from whole rows: columns a token does not see are 0
    gamma = (torch.zeros if grouped else torch.empty)(T, H, W, dtype=torch.float32, device=o.device)
    g_on = torch.empty(T, H, dtype=torch.float32, device=o.device)
    y = torch.empty(T, HV, dv, dtype=o.dtype, device=o.device)
    table = batch.table.contiguous()
    top_k = batch.top_k.contiguous()
    _router_kernel[(n_tiles, H)](
        tiles, u, k, key_sum0, table, top_k, ckpt_key_pool, gamma, g_on, weights if weights is not None else g_on,
        n_tiles, W, spec.segment_size,
        u.stride(0), u.stride(1), k.stride(0), k.stride(1), key_sum0.stride(0), key_sum0.stride(1),
        ckpt_key_pool.stride(0), ckpt_key_pool.stride(1), gamma.stride(0), gamma.stride(1), g_on.stride(0),
        DK=dk, BK=cfg["router"]["BK"], BT=bt, NMAX=nmax, AGG=_AGG[spec.aggregation], KMAX=batch.max_top_k,
        PREV=triton.cdiv(spec.segment_size, bt) - 1, HAS_WEIGHTS=weights is not None,
        num_warps=cfg["router"]["num_warps"],
    )
    qc = q if ieee else q.to(ckpt_pool.dtype)  # the dot's input dtype, converted once for all memories
    if grouped:
        return readout_grouped(o, qc, gamma, g_on, batch, ckpt_pool, ieee)
    bv = cfg["readout"]["BV"]
    _readout_kernel[(n_tiles, HV, triton.cdiv(dv, bv))](
        tiles, qc, o, gamma, g_on, table, ckpt_pool, y,
        n_tiles, W, dk**-0.5,
        qc.stride(0), qc.stride(1), o.stride(0), o.stride(1), gamma.stride(0), gamma.stride(1), g_on.stride(0),
        ckpt_pool.stride(0), ckpt_pool.stride(1), ckpt_pool.stride(2), y.stride(0), y.stride(1),
        G=HV // H, DK=dk, DV=dv, BK=cfg["readout"]["BK"], BV=bv, BT=bt, NMAX=nmax, IEEE=ieee,
        num_warps=cfg["readout"]["num_warps"],
    )
    return y
