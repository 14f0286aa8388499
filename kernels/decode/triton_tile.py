"""Triton device functions of one program of the fused decode kernel (kernels/decode/triton.py, its only
caller): loads of a state tile [BV, BK] (BV rows of dv, each a contiguous dk row: 16-byte loads) and
its v rows, the row's inputs besides the pools, the router pass's choice for a (row, q/k head), and
one tile's update, readout, checkpoint write and store in place. All math fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mcserve.kernels.decode.triton_router import cached_scores, load_unit, readout, readout_selected, to_bf16


@triton.jit
def load_state(state_ptr, ti, hv, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state tile [BV, BK] (rows ti*BV.. of dv) of one (row, v-head), fp32."""
    rv = tl.arange(0, BV)
    cols = tl.arange(0, BK)
    local = rv[:, None] * DK + cols[None, :]  # [BV, BK]: contiguous dk rows (16-byte loads)
    mask = (ti * BV + rv < DV)[:, None] & (cols < DK)[None, :]
    return tl.load(state_ptr + (hv * DV + ti * BV) * DK + local, mask=mask, other=0.0)


@triton.jit
def load_v(v_ptr, ti, DV: tl.constexpr, BV: tl.constexpr):
    """The v rows [BV] (ti*BV.. of dv) of one (row, v-head), fp32."""
    rv = ti * BV + tl.arange(0, BV)
    return tl.load(v_ptr + rv, mask=rv < DV, other=0.0).to(tl.float32)


@triton.jit
def load_tile(state_ptr, v_ptr, ti, hv, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state tile [BV, BK] and the v rows [BV] of one (row, v-head)'s tile ti."""
    return load_state(state_ptr, ti, hv, DK, DV, BK, BV), load_v(v_ptr, ti, DV, BV)


@triton.jit
def row_inputs(positions, write_blocks, q, k, row, h, s_qb, s_qh, s_kb, s_kh, DK: tl.constexpr, BK: tl.constexpr,
                HAS_WRITES: tl.constexpr):
    """What one (row, q/k head) reads besides the pools: position, write block (-1 = none), and q, k
    with their L2 normalisation factors."""
    pos = tl.load(positions + row).to(tl.int64)
    wb = tl.load(write_blocks + row).to(tl.int64) if HAS_WRITES else -1
    q_raw, q_inv = load_unit(q + row * s_qb + h * s_qh, DK, BK)
    k_raw, k_inv = load_unit(k + row * s_kb + h * s_kh, DK, BK)
    return pos, wb, q_raw, q_inv, k_raw, k_inv


@triton.jit
def routes(route_blk, route_w, route_on, rh, W: tl.constexpr, KP: tl.constexpr, AGG: tl.constexpr):
    """The router pass's output for (row, q/k head) rh = row * H + h: (gamma of the online memory,
    SSC's chosen blocks [KP] and weights [KP]; for grm -1 and 0, its loop reads the entries itself)."""
    g_on = tl.load(route_on + rh)
    if AGG == 2:
        sel_b = tl.load(route_blk + rh * W + tl.arange(0, KP))
        sel_w = tl.load(route_w + rh * W + tl.arange(0, KP))
    else:
        sel_b = tl.full([KP], -1, dtype=tl.int64)
        sel_w = tl.full([KP], 0.0, dtype=tl.float32)
    return g_on, sel_b, sel_w


@triton.jit
def update_tile(
    S, vv, state_ptr, y_ptr, ckpt, s_ck, ckpt_sum_ptr, wb, route_blk, route_w, routed, ckpt_key, s_ckey, t_row,
    s_te, ti, hv, h, g, beta, kn, qs, boundary, write, n_valid, u_ptr, u_scale, g_on, sel_b, sel_w, mx, z,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NP: tl.constexpr, BKC: tl.constexpr,
    KP: tl.constexpr, KC: tl.constexpr, BN: tl.constexpr, AGG: tl.constexpr, TWO_PASS: tl.constexpr,
    RESET: tl.constexpr, HAS_CSUM: tl.constexpr, CKPT_BF16: tl.constexpr, STAGES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One loaded tile S [BV, dk] (rows ti*BV.. of dv) of one (row, v-head): update, read out, write
    the checkpoint at a boundary, store in place."""
    rv = tl.arange(0, BV)
    cols = tl.arange(0, BK)
    rows_ok = ti * BV + rv < DV
    m2 = rows_ok[:, None] & (cols < DK)[None, :]
    base = (hv * DV + ti * BV) * DK  # the tile's first element inside a [HV, dv, dk] block
    local = rv[:, None] * DK + cols[None, :]
    S = S * tl.exp(g)
    err = beta * (vv - tl.sum(S * kn[None, :], axis=1))
    S = S + err[:, None] * kn[None, :]
    o = tl.sum(S * qs[None, :], axis=1)  # [BV] online readout

    if AGG == 0:
        out = o
    elif AGG == 1:
        cs = tl.load(ckpt_sum_ptr + base + local, mask=m2, other=0.0)
        out = o + tl.sum(cs * qs[None, :], axis=1)
    else:
        acc = tl.full([BV], 0.0, dtype=tl.float32)
        if AGG == 2:
            acc = readout_selected(ckpt, s_ck, sel_b, sel_w, base, local, rows_ok, qs, DK, BK, KP, KC)
        elif TWO_PASS:
            # grm: every valid entry, KC at a time; Triton pipelines the loads STAGES deep (cp.async).
            # Compiled, the loop stops at the row's last entry; the interpreter cannot take a loop bound
            # from a tensor, so there it runs to NP and the masks stop it (the same sums)
            for e0 in tl.range(0, NP if INTERPRET else n_valid, KC, num_stages=STAGES):
                e = e0 + tl.arange(0, KC)
                blk = tl.load(route_blk + routed + e, mask=e < n_valid, other=-1)
                w = tl.load(route_w + routed + e, mask=e < n_valid, other=0.0)
                acc += readout(ckpt, s_ck, blk, w, base, local, rows_ok, qs, DK, BK)
        else:
            for e0 in tl.range(0, NP if INTERPRET else n_valid, BN, num_stages=STAGES):
                r_c, b_c = cached_scores(t_row, s_te, e0, n_valid, ckpt_key, s_ckey, h, u_ptr, u_scale, BN, DK, BKC)
                acc += readout(ckpt, s_ck, b_c, tl.exp(r_c - mx) / z, base, local, rows_ok, qs, DK, BK)
        out = g_on * o + acc

    if write:
        c_new = to_bf16(S) if CKPT_BF16 else S.to(ckpt.dtype.element_ty)
        tl.store(ckpt + wb * s_ck + base + local, c_new, mask=m2)
        if HAS_CSUM:  # after this token's readout: the new checkpoint is read from the next token on
            cs_old = tl.load(ckpt_sum_ptr + base + local, mask=m2, other=0.0)
            tl.store(ckpt_sum_ptr + base + local, cs_old + c_new.to(tl.float32), mask=m2)
    if RESET:
        S = tl.where(boundary, 0.0, S)
    tl.store(state_ptr + base + local, S, mask=m2)
    tl.store(y_ptr + ti * BV + rv, out.to(y_ptr.dtype.element_ty), mask=rows_ok)
