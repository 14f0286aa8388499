"""Fused Triton decode step of one Gated DeltaNet + Memory Caching layer for a whole batch.

One program per (row, v-head, tile of BV rows of dv) (or per group of a q/k head's v-heads and of
tiles, `KernelConfig`) holds its [BV, dk] tile of the fp32 state in registers from the load to the
store: gates and q/k norms from the projections, the delta-rule update in place in the state pool
(through the row's slot), the online readout, the cached readout of the aggregation, and at a
segment boundary the checkpoint write. Each dv row of the state is
independent of the others (S[v,:] = e^g S[v,:] + beta (v_v - S[v,:] k) k^T), so tiles need no
communication. The router (scores of the row's cached segment keys, SSC's top-k, softmax) runs per
(row, q/k head) either inside every tile program (`two_pass=False`, one launch) or once in a
separate router launch whose [B, H, k] choices the tile programs read (`two_pass=True`).
docs/KERNELS.md has the design and the byte count; `soup` runs as `grm` (identical for linear
memory: reading the gamma-averaged state equals the gamma-weighted sum of the reads).

`triton_decode_step` is the only caller of the kernels (`plan_decode` builds its launches); its launch
config comes from the card's swept table (`tuning.choose_config`) unless the caller gives one. The
per-tile device functions are in triton_tile.py, the MC math's (gates, router, readout) in
triton_router.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mcserve.kernels.decode.contract import DecodeBatch, LayerMemory, check_decode_inputs
from mcserve.kernels.decode.triton_router import (
    cached_scores,
    gate_inputs,
    gate_values,
    gates,
    load_unit,
    router_kernel,
    ssc_select,
    store_key_sum,
    take,
)
from mcserve.kernels.decode.triton_tile import load_state, load_tile, load_v, routes, row_inputs, update_tile
from mcserve.kernels.decode.tuning import KernelConfig, card_of, choose_config, fallback_config
from mcserve.kernels.mc_spec import MCSpec

NONE, RESIDUAL, SSC, GRM = 0, 1, 2, 3
AGG_CODES = {"none": NONE, "residual": RESIDUAL, "ssc": SSC, "grm": GRM, "soup": GRM}
MAX_ENTRIES = 4096  # table width the register-resident router supports (1M tokens at C=256)
MAX_TOP_K = 16


@dataclass(frozen=True, slots=True)
class Launch:
    """One kernel launch: what `triton_decode_step` runs (and what a compile check compiles)."""

    kernel: object
    grid: tuple[int]
    args: tuple
    options: dict


@triton.jit
def _decode_kernel(
    q, k, v, a, b, u, A_log, dt_bias,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ab, s_bb, s_ub, s_uh,
    positions, slots, table, s_tb, s_te, write_blocks, top_k,
    state, s_st, key_sum, s_ks, ckpt, s_ck, ckpt_key, s_ckey, ckpt_sum, s_cs, utility,
    route_blk, route_w, route_on, tickets, y, scale, N,
    C: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, TPP: tl.constexpr,
    HPP: tl.constexpr, NP: tl.constexpr, BKC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr,
    BN: tl.constexpr, W: tl.constexpr, AGG: tl.constexpr, TWO_PASS: tl.constexpr, LEARNED: tl.constexpr,
    NEG_EIGVAL: tl.constexpr, RESET: tl.constexpr, HAS_WRITES: tl.constexpr, HAS_CSUM: tl.constexpr,
    HAS_UTIL: tl.constexpr, PER_ROW_K: tl.constexpr, CKPT_BF16: tl.constexpr, STAGES: tl.constexpr,
    PREFETCH: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per (row, group of HPP v-heads of one q/k head, group of TPP dv tiles): the per-(row,
    q/k head) prologue (norms, routing) once, then per v-head its gates and its tiles in turn.

    PREFETCH: the row's loads that do not depend on its slot (position, write block, q, k, the first
    tile's v and gates) go out beside the slot's load, before the padded-row branch, and the lead
    program's key sum beside the state tile: the dependent chain per program is then slot -> state."""
    NG: tl.constexpr = (NV + TPP - 1) // TPP  # tile groups per v-head
    NH: tl.constexpr = G // HPP  # v-head groups per q/k head
    # scalar index math in int64 (pools of many GB); offsets inside a tile stay int32
    pid = tl.program_id(0).to(tl.int64)
    grp = pid % NG
    sub = (pid // NG) % NH
    h = (pid // (NG * NH)) % H
    row = pid // (NG * NH * H)
    hv0 = h * G + sub * HPP  # this program's first v-head
    cols = tl.arange(0, BK)
    slot = tl.load(slots + row).to(tl.int64)
    if PREFETCH:
        pos, wb, q_raw, q_inv, k_raw, k_inv = row_inputs(positions, write_blocks, q, k, row, h, s_qb, s_qh, s_kb,
                                                          s_kh, DK, BK, HAS_WRITES)
        vv = load_v(v + row * s_vb + hv0 * s_vh, grp * TPP, DV, BV)
        gate0 = gate_inputs(a, b, A_log, dt_bias, row, hv0, s_ab, s_bb)
        if AGG >= 2 and TWO_PASS:  # the router pass's choice: the checkpoint loads then wait on the slot only
            route = routes(route_blk, route_w, route_on, row * H + h, W, KP, AGG)
    if slot < 0:  # a padded row: zero output, no pool touched
        for j in tl.static_range(HPP):
            for t in tl.static_range(TPP):
                rows = (grp * TPP + t) * BV + tl.arange(0, BV)
                tl.store(y + (row * HV + hv0 + j) * DV + rows, tl.full([BV], 0.0, dtype=tl.float32).to(
                    y.dtype.element_ty), mask=rows < DV)
        return
    state_ptr = state + slot * s_st
    ks_ptr = key_sum + slot * s_ks + h * DK + cols
    lead = (sub == 0) & (grp == 0)  # one program per (row, q/k head): utility, key-sum owner
    if PREFETCH:
        S = load_state(state_ptr, grp * TPP, hv0, DK, DV, BK, BV)
        if AGG < 2:  # only the lead program reads (and writes) the key sum here
            ks_old = tl.load(ks_ptr, mask=(cols < DK) & lead, other=0.0)
    else:
        # the first tile's loads go out before the prologue's math (its latency hides behind it)
        S, vv = load_tile(state_ptr, v + row * s_vb + hv0 * s_vh, grp * TPP, hv0, DK, DV, BK, BV)
        pos, wb, q_raw, q_inv, k_raw, k_inv = row_inputs(positions, write_blocks, q, k, row, h, s_qb, s_qh, s_kb,
                                                          s_kh, DK, BK, HAS_WRITES)
    in_seg = pos % C
    boundary = in_seg == C - 1
    n_valid = tl.minimum(pos // C, N)
    write = boundary & (wb >= 0)
    qs = q_raw * (q_inv * scale)
    kn = k_raw * k_inv
    t_row = table + row * s_tb

    # routing: gamma of the online memory, and the cached memories' blocks and weights
    ks = tl.full([BK], 0.0, dtype=tl.float32)
    g_on = 1.0
    mx = 0.0
    z = 1.0
    sel_b = tl.full([KP], -1, dtype=tl.int64)
    sel_w = tl.full([KP], 0.0, dtype=tl.float32)
    u_ptr = q
    u_scale = 1.0
    routed = (row * H + h) * W
    if AGG >= 2:
        if TWO_PASS:
            if PREFETCH:
                g_on, sel_b, sel_w = route[0], route[1], route[2]
            else:
                g_on, sel_b, sel_w = routes(route_blk, route_w, route_on, row * H + h, W, KP, AGG)
        else:
            ks = tl.load(ks_ptr, mask=cols < DK, other=0.0) + kn
            if LEARNED:
                u_ptr = u + row * s_ub + h * s_uh
                u_vec, _ = load_unit(u_ptr, DK, BK)
            else:
                u_ptr = q + row * s_qb + h * s_qh
                u_vec = q_raw * q_inv
                u_scale = q_inv
            r_on = tl.sum(u_vec * ks, axis=0) / (in_seg + 1).to(tl.float32)
            r, blk = cached_scores(t_row, s_te, 0, n_valid, ckpt_key, s_ckey, h, u_ptr, u_scale, NP, DK, BKC)
            if AGG == 2:
                k_row = tl.load(top_k + row) if PER_ROW_K else K
                sel_e, sel_r = ssc_select(r, k_row, NP, K, KP)
                sel_b = tl.where(sel_e >= 0, take(blk, sel_e, NP), -1)  # from registers, no dependent load
                mx = tl.maximum(r_on, tl.max(sel_r, axis=0))
                e_sel = tl.exp(sel_r - mx)
                z = tl.exp(r_on - mx) + tl.sum(e_sel, axis=0)
                sel_w = e_sel / z
            else:
                mx = tl.maximum(r_on, tl.max(r, axis=0))
                z = tl.exp(r_on - mx) + tl.sum(tl.exp(r - mx), axis=0)
            g_on = tl.exp(r_on - mx) / z

    ckpt_sum_ptr = ckpt_sum + slot * s_cs
    for j in tl.static_range(HPP):
        hv = hv0 + j
        if PREFETCH and j == 0:
            g, beta = gate_values(gate0[0], gate0[1], gate0[2], gate0[3], NEG_EIGVAL)
        else:
            g, beta = gates(a, b, A_log, dt_bias, row, hv, s_ab, s_bb, NEG_EIGVAL)
        y_ptr = y + (row * HV + hv) * DV
        for t in tl.static_range(TPP):
            # the next tile's loads (this v-head's next tile, or the next v-head's first) go out before
            # this tile's stores (which they may not pass)
            if t + 1 < TPP:
                S_next, v_next = load_tile(state_ptr, v + row * s_vb + hv * s_vh, grp * TPP + t + 1, hv, DK, DV,
                                            BK, BV)
            elif j + 1 < HPP:
                S_next, v_next = load_tile(state_ptr, v + row * s_vb + (hv + 1) * s_vh, grp * TPP, hv + 1, DK, DV,
                                            BK, BV)
            update_tile(S, vv, state_ptr, y_ptr, ckpt, s_ck, ckpt_sum_ptr, wb, route_blk, route_w, routed, ckpt_key,
                  s_ckey, t_row, s_te, grp * TPP + t, hv, h, g, beta, kn, qs, boundary, write, n_valid, u_ptr,
                  u_scale, g_on, sel_b, sel_w, mx, z, DK, DV, BK, BV, NP, BKC, KP, KC, BN, AGG, TWO_PASS, RESET,
                  HAS_CSUM, CKPT_BF16, STAGES, INTERPRET)
            if t + 1 < TPP or j + 1 < HPP:
                S = S_next
                vv = v_next

    # the router weight each table entry got, once per (row, q/k head); after the tiles, so that no
    # branch stands between the routing and the checkpoint loads
    if HAS_UTIL and AGG >= 1 and not TWO_PASS:
        if lead:
            if AGG == 1:  # residual reads every cached memory with weight 1 per q/k head
                e = tl.arange(0, NP)
                blk = tl.load(t_row + e * s_te, mask=e < n_valid, other=-1).to(tl.int64)
                tl.atomic_add(utility + blk, tl.full([NP], 1.0, dtype=tl.float32), mask=blk >= 0)
            elif AGG == 2:
                tl.atomic_add(utility + sel_b, sel_w, mask=sel_b >= 0)
            else:
                tl.atomic_add(utility + blk, tl.exp(r - mx) / z, mask=blk >= 0)

    if AGG < 2:
        if lead:
            if PREFETCH:
                ks = ks_old + kn
            else:
                ks = tl.load(ks_ptr, mask=cols < DK, other=0.0) + kn
            store_key_sum(ks_ptr, ks, in_seg, wb, ckpt_key, s_ckey, h, C, DK, BK)
    elif not TWO_PASS:
        # every program of this (row, head) read the old key sum above; the last of them to take a
        # ticket writes the new one (the tickets return to zero for the next launch)
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets + row * H + h, 1)
        if ticket == NH * NG - 1:
            tl.atomic_xchg(tickets + row * H + h, 0)
            store_key_sum(ks_ptr, ks, in_seg, wb, ckpt_key, s_ckey, h, C, DK, BK)


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (row, q/k head), kept zero by the kernel between launches.
    Grown (never during a CUDA graph capture: warm up at the largest batch first)."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


def triton_decode_step(*inputs: torch.Tensor | None, **step: object) -> torch.Tensor:
    """The decode step of `contract.DecodeFn` on the Triton kernels: `inputs` are DecodeFn's eight
    tensors in its order (q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias), `step` its keyword arguments
    (spec, batch, memory, allow_neg_eigval, out_dtype) and optionally `config`; `plan_decode` has
    them typed and checks them."""
    if inputs[0].device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton decode path runs on CUDA tensors (or under TRITON_INTERPRET=1), "
                         f"got {inputs[0].device}")
    y, launches = plan_decode(inputs, **step)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.options)
    return y


def _check_triton(q_raw: torch.Tensor, memory: LayerMemory) -> None:
    """What the kernel needs beyond the contract: fp32 state pools, inner dims packed (16-byte rows)."""
    for name in ("state", "key_sum", "ckpt_sum", "utility"):
        t = getattr(memory, name)
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"the Triton decode path needs a float32 {name} pool, got {t.dtype}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def plan_decode(
    inputs: tuple[torch.Tensor | None, ...],
    *,
    spec: MCSpec,
    batch: DecodeBatch,
    memory: LayerMemory,
    allow_neg_eigval: bool = False,
    out_dtype: torch.dtype | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """Checks the inputs, allocates the output y [B, HV, dv] and the router pass's buffers, and
    returns y with the launches that fill it (one; two with config.two_pass for ssc/grm)."""
    q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias = inputs
    B, H, dk = q_raw.shape
    HV, dv = v.shape[1], v.shape[2]
    N = batch.block_table.shape[1]
    check_decode_inputs(q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias, spec, batch, memory)
    _check_triton(q_raw, memory)
    agg = AGG_CODES[spec.aggregation]
    if N > MAX_ENTRIES and agg >= SSC:
        raise ValueError(f"block tables wider than {MAX_ENTRIES} entries are not supported, got {N}")
    K = 1
    if agg == SSC:
        K = batch.top_k_max or (spec.top_k if batch.top_k is None else int(batch.top_k.max()))
        if K > MAX_TOP_K:
            raise ValueError(f"top_k up to {MAX_TOP_K} is supported (use grm beyond), got {K}")
        K = max(1, min(K, N))
    dev = q_raw.device
    cfg = config or choose_config(card_of(dev), H, HV, dk, dv, spec.aggregation, K, B)
    dflt = fallback_config(dk, dv, routed=agg >= SSC)  # fills a config's 0 = "by shape" fields
    BK = triton.next_power_of_2(dk)
    BV = min(cfg.block_v or dflt.block_v, triton.next_power_of_2(dv))
    warps = cfg.num_warps or dflt.num_warps
    NV = triton.cdiv(dv, BV)
    TPP = max(1, min(cfg.tiles_per_program, NV))
    HPP = math.gcd(cfg.heads_per_program, HV // H)
    NP = max(16, triton.next_power_of_2(max(N, 1)))
    budget = 2048 * warps  # fp32 elements of one temporary tile (~64 registers per thread)
    KP = triton.next_power_of_2(K)
    KC = max(1, min(KP, _pow2_at_most(budget // (BV * BK))))
    BN = max(1, min(NP, _pow2_at_most(budget // (BV * BK))))
    BKC = max(1, min(BK, _pow2_at_most(budget // NP)))
    two_pass = cfg.two_pass and agg >= SSC
    W = KP if agg == SSC else NP

    y = torch.empty(B, HV, dv, dtype=out_dtype or memory.state.dtype, device=dev)
    route_blk = route_w = route_on = tickets = None
    if agg >= SSC:
        if two_pass:
            route_blk = torch.empty(B, H, W, dtype=torch.int64, device=dev)
            route_w = torch.empty(B, H, W, dtype=torch.float32, device=dev)
            route_on = torch.empty(B, H, dtype=torch.float32, device=dev)
        else:
            tickets = _tickets(dev, B * H)
    writes = batch.write_rows is None or batch.write_rows.numel() > 0
    learned = u_raw is not None
    per_row_k = agg == SSC and batch.top_k is not None
    t = batch.block_table
    m = memory
    uu = u_raw if learned else q_raw
    flags = dict(C=spec.segment_size, H=H, DK=dk, BK=BK, NP=NP, BKC=BKC, K=K, KP=KP, W=W, AGG=agg,
                 LEARNED=learned, HAS_WRITES=writes, HAS_UTIL=m.utility is not None, PER_ROW_K=per_row_k)
    launches = []
    if two_pass:
        launches.append(Launch(router_kernel, (B * H,), (
            q_raw, k_raw, uu, q_raw.stride(0), q_raw.stride(1), k_raw.stride(0), k_raw.stride(1),
            uu.stride(0), uu.stride(1), batch.positions, batch.slots, t, t.stride(0), t.stride(1),
            batch.write_blocks, batch.top_k, m.key_sum, m.key_sum.stride(0), m.ckpt_key, m.ckpt_key.stride(0),
            m.utility, route_blk, route_w, route_on, N), dict(num_warps=cfg.router_warps, **flags)))
    cs = m.ckpt_sum if m.ckpt_sum is not None else m.state
    launches.append(Launch(_decode_kernel, (B * (HV // HPP) * triton.cdiv(NV, TPP),), (
        q_raw, k_raw, v, a, b, uu, A_log, dt_bias,
        q_raw.stride(0), q_raw.stride(1), k_raw.stride(0), k_raw.stride(1), v.stride(0), v.stride(1),
        a.stride(0), b.stride(0), uu.stride(0), uu.stride(1),
        batch.positions, batch.slots, t, t.stride(0), t.stride(1), batch.write_blocks, batch.top_k,
        m.state, m.state.stride(0), m.key_sum, m.key_sum.stride(0), m.ckpt, m.ckpt.stride(0),
        m.ckpt_key, m.ckpt_key.stride(0), cs, cs.stride(0), m.utility,
        route_blk, route_w, route_on, tickets, y, dk**-0.5, N), dict(
        G=HV // H, HV=HV, DV=dv, BV=BV, NV=NV, TPP=TPP, HPP=HPP, KC=KC, BN=BN, TWO_PASS=two_pass,
        NEG_EIGVAL=allow_neg_eigval, RESET=spec.reset, HAS_CSUM=m.ckpt_sum is not None,
        CKPT_BF16=m.ckpt.dtype == torch.bfloat16, STAGES=cfg.num_stages, PREFETCH=cfg.prefetch,
        INTERPRET=_interpreting(),
        num_warps=warps, **flags)))
    return y, launches
