"""Prototype (not served): the decode step of one layer that does not write the fp32 state every step.

ReplaySSM's idea (vLLM PR #48792) for Gated DeltaNet + Memory Caching. Per slot the state pool holds
S_0, the state as last materialised, and a log of the steps since: per step i the normalised key k_i
(per q/k head), v_i, g_i and beta_i (per v-head), fp32. With alpha_i = exp(g_i) the update is
S_i = alpha_i S_{i-1} (I - beta_i k_i k_i^T) + beta_i v_i k_i^T, so for the readout of step t

    S_t q = S_0 x_0 + sum_{i=1..t} beta_i v_i (k_i . x_i),   x_t = q,
    x_{i-1} = alpha_i (x_i - beta_i k_i (k_i . x_i)),

one read of S_0 for one vector plus a backward pass over dk-vectors. A step appends its own entry;
it materialises instead (applies the log and its own update to S_0 in registers, writes S, empties the
log) when the log would hold W entries, or the row ends a segment (its checkpoint is the state, and
`reset` zeroes it). Any other reader of a slot's state calls `materialise(slots)` first; whoever writes
a slot's state (prefill, restore) empties its log (`ReplayLog.count[slot] = 0`).

Layout: one program per (row, v-head, group of TPP dv tiles of BV rows). The backward pass runs once
per program, then per tile S_0 [BV, dk] x_0 + the logged v rows [W-1, BV] weighted by beta_i (k_i .
x_i). A flushing row's programs run the existing kernel's tile update (triton_tile.update_tile: update,
readout, cached readout, checkpoint write, reset, store) after applying the log. Aggregations `none`
and `ssc`; ssc routes in the existing router pass (triton_router.router_kernel: key sum, segment key,
top-k, weights, utility), as the existing kernel's two-pass form. The log's count is read by every
program of a row and written by the last to take the row's ticket. docs/KERNELS.md, "Replay decode".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mcserve.kernels.decode.contract import DecodeBatch, LayerMemory, check_decode_inputs
from mcserve.kernels.decode.triton import MAX_TOP_K, Launch, _check_triton, _interpreting
from mcserve.kernels.decode.triton_router import gates, readout_selected, router_kernel, store_key_sum
from mcserve.kernels.decode.triton_tile import load_state, load_v, routes, row_inputs, update_tile
from mcserve.kernels.decode.tuning import KernelConfig, fallback_config
from mcserve.kernels.mc_spec import MCSpec

REPLAY_AGGREGATIONS = ("none", "ssc")


@dataclass(frozen=True, slots=True)
class ReplayLog:
    """One layer's per-slot log of the steps since the slot's state was materialised (W - 1 entries).

    k: [slots, H, W-1, dk] fp32 normalised keys; v: [slots, HV, W-1, dv] fp32;
    gb: [slots, HV, W-1, 2] fp32 (g = log-decay, beta); count: [slots] int32, entries held (< W).
    Entries at index >= count are never read (they may hold anything)."""

    k: torch.Tensor
    v: torch.Tensor
    gb: torch.Tensor
    count: torch.Tensor

    @property
    def window(self) -> int:
        return self.k.shape[2] + 1

    @staticmethod
    def empty(slots: int, H: int, HV: int, dk: int, dv: int, window: int, device: torch.device | str) -> ReplayLog:
        if window < 2:
            raise ValueError(f"the replay window must be >= 2 steps, got {window}")
        n = window - 1
        f32 = dict(dtype=torch.float32, device=device)
        return ReplayLog(torch.empty(slots, H, n, dk, **f32), torch.empty(slots, HV, n, dv, **f32),
                         torch.empty(slots, HV, n, 2, **f32), torch.zeros(slots, dtype=torch.int32, device=device))


@triton.jit
def _replay_kernel(
    q, k, v, a, b, A_log, dt_bias, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ab, s_bb,
    positions, slots, write_blocks, state, s_st, key_sum, s_ks, ckpt, s_ck, ckpt_key, s_ckey,
    log_k, s_lk, log_v, s_lv, log_gb, s_lg, count, tickets, route_blk, route_w, route_on, y, scale,
    C: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, TPP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    KP: tl.constexpr, KC: tl.constexpr, AGG: tl.constexpr, NEG_EIGVAL: tl.constexpr, RESET: tl.constexpr,
    HAS_WRITES: tl.constexpr, CKPT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per (row, v-head, group of TPP dv tiles): replay readout and a log append, or (a
    flushing row) the log applied and the existing tile update; AGG 0 = none, 2 = ssc (routed before)."""
    NG: tl.constexpr = (NV + TPP - 1) // TPP
    NL: tl.constexpr = W - 1  # log entries a slot holds at most
    pid = tl.program_id(0).to(tl.int64)
    grp = pid % NG
    hv = (pid // NG) % HV
    row = pid // (NG * HV)
    h = hv // G
    rv = tl.arange(0, BV)
    cols = tl.arange(0, BK)
    y_ptr = y + (row * HV + hv) * DV
    slot = tl.load(slots + row).to(tl.int64)
    if slot < 0:  # a padded row: zero output, no pool touched, no ticket
        for t in tl.static_range(TPP):
            rows = (grp * TPP + t) * BV + rv
            tl.store(y_ptr + rows, tl.full([BV], 0.0, dtype=tl.float32).to(y.dtype.element_ty), mask=rows < DV)
        return
    pos, wb, q_raw, q_inv, k_raw, k_inv = row_inputs(positions, write_blocks, q, k, row, h, s_qb, s_qh, s_kb, s_kh,
                                                      DK, BK, HAS_WRITES)
    n = tl.load(count + slot)
    in_seg = pos % C
    boundary = in_seg == C - 1
    write = boundary & (wb >= 0)
    flush = boundary | (n + 1 >= W)
    qs = q_raw * (q_inv * scale)
    kn = k_raw * k_inv
    g, beta = gates(a, b, A_log, dt_bias, row, hv, s_ab, s_bb, NEG_EIGVAL)
    g_on = 1.0
    sel_b = tl.full([KP], -1, dtype=tl.int64)
    sel_w = tl.full([KP], 0.0, dtype=tl.float32)
    if AGG == 2:
        g_on, sel_b, sel_w = routes(route_blk, route_w, route_on, row * H + h, KP, KP, AGG)
    state_ptr = state + slot * s_st
    v_ptr = v + row * s_vb + hv * s_vh
    lk = log_k + slot * s_lk + h * NL * DK  # [NL, DK] of this q/k head
    lv = log_v + slot * s_lv + hv * NL * DV  # [NL, DV] of this v-head
    lg = log_gb + slot * s_lg + hv * NL * 2  # [NL, 2]

    if flush:
        for t in tl.static_range(TPP):
            ti = grp * TPP + t
            S = load_state(state_ptr, ti, hv, DK, DV, BK, BV)
            vv = load_v(v_ptr, ti, DV, BV)
            # the logged steps in order, as the existing kernel runs them; past the count the masked
            # loads give g = beta = 0, k = v = 0: S * 1 + 0, S unchanged
            for i in tl.static_range(NL):
                ok = i < n
                ki = tl.load(lk + i * DK + cols, mask=ok & (cols < DK), other=0.0)
                vi = tl.load(lv + i * DV + ti * BV + rv, mask=ok & (ti * BV + rv < DV), other=0.0)
                gi = tl.load(lg + 2 * i, mask=ok, other=0.0)
                bi = tl.load(lg + 2 * i + 1, mask=ok, other=0.0)
                S = S * tl.exp(gi)
                err = bi * (vi - tl.sum(S * ki[None, :], axis=1))
                S = S + err[:, None] * ki[None, :]
            update_tile(S, vv, state_ptr, y_ptr, ckpt, s_ck, state_ptr, wb, route_blk, route_w, 0, ckpt_key, s_ckey,
                        slots, 0, ti, hv, h, g, beta, kn, qs, boundary, write, 0, q, 1.0, g_on, sel_b, sel_w, 0.0,
                        1.0, DK, DV, BK, BV, 16, BK, KP, KC, 1, AGG, True, RESET, False, CKPT_BF16, 1, INTERPRET)
    else:
        # backward pass: this step (entry n), then the logged ones newest first; c_i = beta_i (k_i . x_i)
        kx = tl.sum(kn * qs, axis=0)
        c_now = beta * kx
        x = tl.exp(g) * (qs - (beta * kx) * kn)
        e = tl.arange(0, WP)
        c = tl.full([WP], 0.0, dtype=tl.float32)
        for j in tl.static_range(NL):
            i = n - 1 - j
            ok = i >= 0
            ki = tl.load(lk + i * DK + cols, mask=ok & (cols < DK), other=0.0)
            gi = tl.load(lg + 2 * i, mask=ok, other=0.0)
            bi = tl.load(lg + 2 * i + 1, mask=ok, other=0.0)
            kx = tl.sum(ki * x, axis=0)
            c = tl.where(e == i, bi * kx, c)
            x = tl.where(ok, tl.exp(gi) * (x - (bi * kx) * ki), x)
        for t in tl.static_range(TPP):
            ti = grp * TPP + t
            rows = ti * BV + rv
            rows_ok = rows < DV
            S0 = load_state(state_ptr, ti, hv, DK, DV, BK, BV)
            vv = load_v(v_ptr, ti, DV, BV)
            vl = tl.load(lv + e[:, None] * DV + rows[None, :], mask=(e < n)[:, None] & rows_ok[None, :], other=0.0)
            o = tl.sum(S0 * x[None, :], axis=1) + tl.sum(c[:, None] * vl, axis=0) + c_now * vv
            if AGG == 2:
                base = (hv * DV + ti * BV) * DK
                local = rv[:, None] * DK + cols[None, :]
                o = g_on * o + readout_selected(ckpt, s_ck, sel_b, sel_w, base, local, rows_ok, qs, DK, BK, KP, KC)
            tl.store(y_ptr + rows, o.to(y.dtype.element_ty), mask=rows_ok)
            tl.store(lv + n * DV + rows, vv, mask=rows_ok)  # the append; no program reads entry n this step
        if grp == 0:
            tl.store(lg + 2 * n, g)
            tl.store(lg + 2 * n + 1, beta)
            if hv % G == 0:
                tl.store(lk + n * DK + cols, kn, mask=cols < DK)

    if AGG == 0:  # the key sum's owner per (row, q/k head); ssc's router pass owns it otherwise
        if (grp == 0) & (hv % G == 0):
            ks_ptr = key_sum + slot * s_ks + h * DK + cols
            ks = tl.load(ks_ptr, mask=cols < DK, other=0.0) + kn
            store_key_sum(ks_ptr, ks, in_seg, wb, ckpt_key, s_ckey, h, C, DK, BK)
    # every program of the row read the count above; the last to take the row's ticket writes the new one
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets + row, 1)
    if ticket == HV * NG - 1:
        tl.atomic_xchg(tickets + row, 0)
        tl.store(count + slot, tl.where(flush, 0, n + 1))



_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per row, kept zero by the kernel between launches. Grown (never during
    a CUDA graph capture: warm up at the largest batch first)."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


def check_log(log: ReplayLog, memory: LayerMemory, H: int, HV: int, dk: int, dv: int) -> None:
    """ValueError naming the log tensor whose shape, dtype or layout does not fit the state pool."""
    slots, n = memory.state.shape[0], log.k.shape[2] if log.k.dim() == 4 else -1
    want = {"k": (log.k, (slots, H, n, dk)), "v": (log.v, (slots, HV, n, dv)), "gb": (log.gb, (slots, HV, n, 2))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"log.{name} must be float32 {shape}, got {t.dtype} {tuple(t.shape)}")
        if not t[0].is_contiguous():
            raise ValueError(f"log.{name} must have packed inner dims, got strides {t.stride()}")
    if tuple(log.count.shape) != (slots,) or log.count.dtype != torch.int32:
        raise ValueError(f"log.count must be int32 ({slots},), got {log.count.dtype} {tuple(log.count.shape)}")
    for name in ("k", "v", "gb", "count"):
        if getattr(log, name).device != memory.state.device:
            raise ValueError(f"log.{name} is on {getattr(log, name).device}, the state on {memory.state.device}")


def plan_replay(
    inputs: tuple[torch.Tensor | None, ...],
    *,
    spec: MCSpec,
    batch: DecodeBatch,
    memory: LayerMemory,
    log: ReplayLog,
    allow_neg_eigval: bool = False,
    out_dtype: torch.dtype | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """Checks the inputs, allocates y [B, HV, dv] (and ssc's route buffers) and returns y with the
    launches that fill it: the router pass (ssc) and the replay kernel. Of `config` only block_v,
    num_warps, tiles_per_program and router_warps apply (0 fields: the existing kernel's fallback)."""
    q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias = inputs
    B, H, dk = q_raw.shape
    HV, dv = v.shape[1], v.shape[2]
    N = batch.block_table.shape[1]
    if spec.aggregation not in REPLAY_AGGREGATIONS:
        raise ValueError(f"the replay step serves aggregations {REPLAY_AGGREGATIONS}, got {spec.aggregation!r}")
    check_decode_inputs(q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias, spec, batch, memory)
    _check_triton(q_raw, memory)
    check_log(log, memory, H, HV, dk, dv)
    ssc = spec.aggregation == "ssc"
    K = 1
    if ssc:
        K = batch.top_k_max or (spec.top_k if batch.top_k is None else int(batch.top_k.max()))
        if K > MAX_TOP_K:
            raise ValueError(f"top_k up to {MAX_TOP_K} is supported, got {K}")
        K = max(1, min(K, N))
    dev = q_raw.device
    cfg = config or KernelConfig()
    dflt = fallback_config(dk, dv, routed=ssc)
    BK = triton.next_power_of_2(dk)
    BV = min(cfg.block_v or dflt.block_v, triton.next_power_of_2(dv))
    warps = cfg.num_warps or dflt.num_warps
    NV = triton.cdiv(dv, BV)
    TPP = max(1, min(cfg.tiles_per_program, NV))
    budget = 2048 * warps
    KP = triton.next_power_of_2(K)
    KC = max(1, min(KP, _pow2_at_most(budget // (BV * BK))))
    W = log.window

    y = torch.empty(B, HV, dv, dtype=out_dtype or memory.state.dtype, device=dev)
    writes = batch.write_rows is None or batch.write_rows.numel() > 0
    m = memory
    launches = []
    route_blk = route_w = route_on = None
    if ssc:
        NP = max(16, triton.next_power_of_2(max(N, 1)))
        BKC = max(1, min(BK, _pow2_at_most(budget // NP)))
        route_blk = torch.empty(B, H, KP, dtype=torch.int64, device=dev)
        route_w = torch.empty(B, H, KP, dtype=torch.float32, device=dev)
        route_on = torch.empty(B, H, dtype=torch.float32, device=dev)
        uu = u_raw if u_raw is not None else q_raw
        t = batch.block_table
        launches.append(Launch(router_kernel, (B * H,), (
            q_raw, k_raw, uu, q_raw.stride(0), q_raw.stride(1), k_raw.stride(0), k_raw.stride(1),
            uu.stride(0), uu.stride(1), batch.positions, batch.slots, t, t.stride(0), t.stride(1),
            batch.write_blocks, batch.top_k, m.key_sum, m.key_sum.stride(0), m.ckpt_key, m.ckpt_key.stride(0),
            m.utility, route_blk, route_w, route_on, N), dict(
            C=spec.segment_size, H=H, DK=dk, BK=BK, NP=NP, BKC=BKC, K=K, KP=KP, W=KP, AGG=2,
            LEARNED=u_raw is not None, HAS_WRITES=writes, HAS_UTIL=m.utility is not None,
            PER_ROW_K=batch.top_k is not None, num_warps=cfg.router_warps)))
    launches.append(Launch(_replay_kernel, (B * HV * triton.cdiv(NV, TPP),), (
        q_raw, k_raw, v, a, b, A_log, dt_bias, q_raw.stride(0), q_raw.stride(1), k_raw.stride(0), k_raw.stride(1),
        v.stride(0), v.stride(1), a.stride(0), b.stride(0), batch.positions, batch.slots, batch.write_blocks,
        m.state, m.state.stride(0), m.key_sum, m.key_sum.stride(0), m.ckpt, m.ckpt.stride(0), m.ckpt_key,
        m.ckpt_key.stride(0), log.k, log.k.stride(0), log.v, log.v.stride(0), log.gb, log.gb.stride(0), log.count,
        _tickets(dev, B), route_blk, route_w, route_on, y, dk**-0.5), dict(
        C=spec.segment_size, H=H, HV=HV, G=HV // H, DK=dk, DV=dv, BK=BK, BV=BV, NV=NV, TPP=TPP, W=W,
        WP=max(2, triton.next_power_of_2(W - 1)), KP=KP, KC=KC, AGG=2 if ssc else 0, NEG_EIGVAL=allow_neg_eigval,
        RESET=spec.reset, HAS_WRITES=writes, CKPT_BF16=m.ckpt.dtype == torch.bfloat16, INTERPRET=_interpreting(),
        num_warps=warps)))
    return y, launches


def replay_decode_step(*inputs: torch.Tensor | None, log: ReplayLog, **step: object) -> torch.Tensor:
    """`contract.DecodeFn`'s step in replay form: `inputs` are its eight tensors, `step` its keyword
    arguments (and optionally `config`), `log` the layer's replay log. The state pool then holds each
    slot's last materialised state: `materialise` before reading it."""
    if inputs[0].device.type != "cuda" and not _interpreting():
        raise ValueError(f"the replay decode step runs on CUDA tensors (or under TRITON_INTERPRET=1), "
                         f"got {inputs[0].device}")
    y, launches = plan_replay(inputs, log=log, **step)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.options)
    return y


def materialise(state: torch.Tensor, log: ReplayLog, slots: torch.Tensor) -> None:
    """Apply each given slot's log to its state pool entry ([slots, HV, dv, dk] fp32, in place) and empty
    the log, in the kernel's order of operations; slots < 0 are skipped. Torch (any device, no sync):
    W - 1 masked passes over the slots' states, for the rare reader (a snapshot, a prefill that resumes
    the slot, a check)."""
    slots = slots.long()
    slots = slots[slots >= 0]
    if slots.numel() == 0:
        return
    H, HV = log.k.shape[1], log.v.shape[1]
    n = log.count[slots].long()
    s = state[slots]  # [S, HV, dv, dk]
    for i in range(log.window - 1):
        on = (i < n)[:, None]  # [S, 1]; entries past the count may hold anything (NaN): where, not a product
        k = torch.where(on[..., None], log.k[slots, :, i], 0.0).repeat_interleave(HV // H, dim=1)  # [S, HV, dk]
        v = torch.where(on[..., None], log.v[slots, :, i], 0.0)
        g = torch.where(on, log.gb[slots, :, i, 0], 0.0)
        beta = torch.where(on, log.gb[slots, :, i, 1], 0.0)
        s = s * torch.exp(g)[..., None, None]
        err = beta[..., None] * (v - (s * k[:, :, None, :]).sum(-1))
        s = s + err[..., None] * k[:, :, None, :]
    state[slots] = s
    log.count[slots] = 0


def _pow2_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)
