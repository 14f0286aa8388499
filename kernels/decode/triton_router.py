"""Triton device functions of one decode row's Memory Caching math, called only from the kernels in
kernels/decode/triton.py: the gates and q/k norms from the projections (as kernels/gates.py), the
router scores of cached segment keys read through the block table, SSC's top-k without a sort
(k rounds of "max, then the lowest entry among ties", the order of kernels/router.py), the softmax
weights, and the weighted readout of checkpoint tiles.

All math is fp32. Vectors over dk are [BK] (BK = next power of two of DK, zero past DK); a state or
checkpoint tile is [BV, BK]: BV rows of dv, each a contiguous dk row (16-byte loads).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gates(a, b, A_log, dt_bias, row, hv, s_ab, s_bb, NEG_EIGVAL: tl.constexpr):
    """(log-decay g, beta) of one (row, v-head): g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)."""
    a_x, bias, A, b_x = gate_inputs(a, b, A_log, dt_bias, row, hv, s_ab, s_bb)
    return gate_values(a_x, bias, A, b_x, NEG_EIGVAL)


@triton.jit
def gate_inputs(a, b, A_log, dt_bias, row, hv, s_ab, s_bb):
    """The four scalars `gate_values` needs, fp32: all loaded before any math (the compiler branches on
    softplus's x > 20, and a load placed after that branch would wait for the first two to arrive)."""
    a_x = tl.load(a + row * s_ab + hv).to(tl.float32)
    bias = tl.load(dt_bias + hv).to(tl.float32)
    A = tl.load(A_log + hv).to(tl.float32)
    b_x = tl.load(b + row * s_bb + hv).to(tl.float32)
    return a_x, bias, A, b_x


@triton.jit
def gate_values(a_x, bias, A, b_x, NEG_EIGVAL: tl.constexpr):
    x = a_x + bias
    # softplus as max(x, 0) + log(1 + e^-|x|), which never overflows; torch returns x above 20
    sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
    g = -tl.exp(A) * sp
    beta = 1.0 / (1.0 + tl.exp(-b_x))
    if NEG_EIGVAL:
        beta = beta * 2.0
    return g, beta


@triton.jit
def to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, exactly as torch rounds (also under Triton's interpreter,
    whose own cast truncates). x finite."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_unit(ptr, DK: tl.constexpr, BK: tl.constexpr):
    """A dk vector and its L2 normalisation factor: (x [BK] fp32, 1 / sqrt(sum x^2 + 1e-6))."""
    cols = tl.arange(0, BK)
    x = tl.load(ptr + cols, mask=cols < DK, other=0.0).to(tl.float32)
    return x, 1.0 / tl.sqrt(tl.sum(x * x, axis=0) + 1e-6)


@triton.jit
def cached_scores(table_row, s_te, start, n_valid, keys, s_key, h, u_raw, u_scale,
                  NB: tl.constexpr, DK: tl.constexpr, BKC: tl.constexpr):
    """Router scores <u, p_e> of the table entries e = start .. start+NB-1 of one (row, head).

    u = u_raw * u_scale is read from memory in BKC-wide dk chunks so that an [NB, BKC] tile of keys
    stays within registers for any NB. Entries >= n_valid (beyond the row's segment or the table)
    and holes (-1) are never read. Returns (scores [NB], -inf where not valid; block ids [NB] int64,
    -1 where not valid)."""
    e = start + tl.arange(0, NB)
    blk = tl.load(table_row + e * s_te, mask=e < n_valid, other=-1).to(tl.int64)
    ok = blk >= 0
    base = keys + blk * s_key + h * DK
    r = tl.full([NB], 0.0, dtype=tl.float32)
    for k0 in tl.static_range(0, DK, BKC):
        kk = k0 + tl.arange(0, BKC)
        mk = kk < DK
        uc = tl.load(u_raw + kk, mask=mk, other=0.0).to(tl.float32) * u_scale
        p = tl.load(base[:, None] + kk[None, :], mask=ok[:, None] & mk[None, :], other=0.0).to(tl.float32)
        r += tl.sum(p * uc[None, :], axis=1)
    return tl.where(ok, r, float("-inf")), blk


@triton.jit
def ssc_select(r, k_row, NB: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """SSC's choice among scores r [NB] (-inf = not a candidate): the k_row (<= K) highest, ties to
    the lower entry, without a sort: K rounds of (max, lowest index among ties), each taking its
    winner out. Returns (entries [KP] int32, -1 = none; scores [KP], -inf = none); the chosen ones
    fill a prefix, best first."""
    e = tl.arange(0, NB)
    j_ids = tl.arange(0, KP)
    sel_e = tl.full([KP], -1, dtype=tl.int32)
    sel_r = tl.full([KP], float("-inf"), dtype=tl.float32)
    for j in tl.static_range(K):
        m, i = tl.max(r, axis=0, return_indices=True, return_indices_tie_break_left=True)
        take = tl.where(m > float("-inf"), (j_ids == j) & (j_ids < k_row), False)
        sel_e = tl.where(take, i, sel_e)
        sel_r = tl.where(take, m, sel_r)
        r = tl.where(e == i, float("-inf"), r)
    return sel_e, sel_r


@triton.jit
def take(vec, idx, KP: tl.constexpr):
    """vec[idx] for a register vector vec [KP] and indices idx [KC] < KP."""
    hit = tl.arange(0, KP)[None, :] == idx[:, None]
    return tl.sum(tl.where(hit, vec[None, :], 0), axis=1)


@triton.jit
def readout(ckpt, s_ck, blk, w, base, local, rows_ok, q, DK: tl.constexpr, BK: tl.constexpr):
    """sum_j w_j (C_blk_j q) over one [BV] row tile: checkpoints blk [NB] (-1 = skip, never read) with
    weights w [NB]; the tile starts at element `base` of a block, `local` [BV, BK] are its offsets.
    Returns [BV] fp32."""
    cols = tl.arange(0, BK)
    ok = (blk >= 0)[:, None, None] & rows_ok[None, :, None] & (cols < DK)[None, None, :]
    c = tl.load(ckpt + (blk * s_ck + base)[:, None, None] + local[None, :, :], mask=ok, other=0.0).to(tl.float32)
    cq = tl.sum(c * q[None, None, :], axis=2)  # [NB, BV]
    return tl.sum(w[:, None] * cq, axis=0)


@triton.jit
def readout_selected(ckpt, s_ck, sel_b, sel_w, base, local, rows_ok, q,
                     DK: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr):
    """readout() of KP selected checkpoints held in registers, KC at a time (register budget)."""
    if KC == KP:
        acc = readout(ckpt, s_ck, sel_b, sel_w, base, local, rows_ok, q, DK, BK)
    else:
        acc = tl.full([local.shape[0]], 0.0, dtype=tl.float32)
        for j0 in tl.static_range(0, KP, KC):
            jj = j0 + tl.arange(0, KC)
            acc += readout(ckpt, s_ck, take(sel_b, jj, KP), take(sel_w, jj, KP), base, local, rows_ok, q, DK, BK)
    return acc


@triton.jit
def router_kernel(
    q, k, u, s_qb, s_qh, s_kb, s_kh, s_ub, s_uh,
    positions, slots, table, s_tb, s_te, write_blocks, top_k,
    key_sum, s_ks, ckpt_key, s_ckey, utility,
    route_blk, route_w, route_on, N,
    C: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr, NP: tl.constexpr,
    BKC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, AGG: tl.constexpr,
    LEARNED: tl.constexpr, HAS_WRITES: tl.constexpr, HAS_UTIL: tl.constexpr, PER_ROW_K: tl.constexpr,
):
    """Per (row, q/k head): key sum, scores, choice and weights -> route_* [B, H, W], route_on [B, H]."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // H
    h = pid % H
    slot = tl.load(slots + row).to(tl.int64)
    if slot < 0:
        return
    pos = tl.load(positions + row).to(tl.int64)
    wb = tl.load(write_blocks + row).to(tl.int64) if HAS_WRITES else -1
    in_seg = pos % C
    n_valid = tl.minimum(pos // C, N)
    q_raw, q_inv = load_unit(q + row * s_qb + h * s_qh, DK, BK)
    k_raw, k_inv = load_unit(k + row * s_kb + h * s_kh, DK, BK)
    cols = tl.arange(0, BK)
    ks_ptr = key_sum + slot * s_ks + h * DK + cols
    ks = tl.load(ks_ptr, mask=cols < DK, other=0.0) + k_raw * k_inv
    if LEARNED:
        u_ptr = u + row * s_ub + h * s_uh
        u_vec, _ = load_unit(u_ptr, DK, BK)
        u_scale = 1.0
    else:
        u_ptr = q + row * s_qb + h * s_qh
        u_vec = q_raw * q_inv
        u_scale = q_inv
    r_on = tl.sum(u_vec * ks, axis=0) / (in_seg + 1).to(tl.float32)
    r, blk = cached_scores(table + row * s_tb, s_te, 0, n_valid, ckpt_key, s_ckey, h, u_ptr, u_scale, NP, DK, BKC)
    out = (row * H + h) * W
    if AGG == 2:
        k_row = tl.load(top_k + row) if PER_ROW_K else K
        sel_e, sel_r = ssc_select(r, k_row, NP, K, KP)
        sel_b = tl.where(sel_e >= 0, take(blk, sel_e, NP), -1)
        mx = tl.maximum(r_on, tl.max(sel_r, axis=0))
        e_sel = tl.exp(sel_r - mx)
        z = tl.exp(r_on - mx) + tl.sum(e_sel, axis=0)
        jj = tl.arange(0, KP)
        tl.store(route_blk + out + jj, sel_b)
        tl.store(route_w + out + jj, e_sel / z)
        if HAS_UTIL:
            tl.atomic_add(utility + sel_b, e_sel / z, mask=sel_b >= 0)
    else:
        mx = tl.maximum(r_on, tl.max(r, axis=0))
        e = tl.exp(r - mx)
        z = tl.exp(r_on - mx) + tl.sum(e, axis=0)
        ee = tl.arange(0, NP)
        tl.store(route_blk + out + ee, blk)
        tl.store(route_w + out + ee, e / z)
        if HAS_UTIL:
            tl.atomic_add(utility + blk, e / z, mask=blk >= 0)
    tl.store(route_on + row * H + h, tl.exp(r_on - mx) / z)
    store_key_sum(ks_ptr, ks, in_seg, wb, ckpt_key, s_ckey, h, C, DK, BK)


@triton.jit
def store_key_sum(ks_ptr, ks, in_seg, wb, ckpt_key, s_ckey, h, C: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr):
    """The new key sum; at a boundary the segment key (mean) to the write block wb (-1: none) and a
    zero sum."""
    cols = tl.arange(0, BK)
    if in_seg == C - 1:
        if wb >= 0:
            tl.store(ckpt_key + wb * s_ckey + h * DK + cols, ks / C, mask=cols < DK)
        tl.store(ks_ptr, tl.full([BK], 0.0, dtype=tl.float32), mask=cols < DK)
    else:
        tl.store(ks_ptr, ks, mask=cols < DK)
