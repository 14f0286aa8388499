"""Batched prefill of many chunks in the packed layout (varlen.py), in pure torch: the CPU serving
path, and the oracle of the fla core and the Triton readout on the GPU.

Both stages walk the chunks in *rounds*: round r takes the r-th sub-piece (at most `chunk_size`
tokens of one segment, cut exactly where kernels/prefill/torch.py's per-sequence path cuts) of every
chunk that has one, pads them to one length and runs them as one batch. Padding rows carry g = 0,
beta = 0 and k = 0, which leave the state unchanged, and are dropped from every output and weight.

- `core_rounds`: the online gated delta rule (torch.py's `delta_rule_chunk` over chunks x heads),
  states in and out of their slots, checkpoints written to their blocks at boundaries.
- `readout_rounds`: the MC readout of every token from the memory tables, after the core has written
  this step's checkpoints; reads only the checkpoints that some token of the round selects (the
  union of a row's choices, or each token's own k when the choices spread: `reads_per_token`).
- `short_conv_rows`: the short causal conv + SiLU of every token (the model's, before the core).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.torch import delta_rule_chunk
from mcserve.kernels.prefill.varlen import VarlenBatch, to_device
from mcserve.kernels.router import chosen_mask, mc_gamma


@dataclass(frozen=True, slots=True)
class _Round:
    seqs: torch.Tensor  # [S] chunk index of each row of the round
    rows: torch.Tensor  # [S, L] packed token rows (padding repeats a real row)
    real: torch.Tensor  # [S, L] bool
    dest: torch.Tensor  # [n_real] packed rows of the real entries, in [S * L] order
    src: torch.Tensor  # [n_real] their index in [S * L]
    offset: torch.Tensor  # [S] position of the first row inside its segment
    fresh: torch.Tensor  # [S] bool: the sub-piece starts a segment (its running key sum starts at 0)
    segment: torch.Tensor  # [S] memories its tokens see
    max_segment: int
    end_rows: torch.Tensor  # [E] rows of the round that end a segment
    end_blocks: torch.Tensor  # [E] the blocks their checkpoints go to


def rounds(batch: VarlenBatch, chunk_size: int) -> list[_Round]:
    """The round layout of `batch` (memoised on it)."""
    return batch.memo(("torch_rounds", chunk_size), lambda: _build_rounds(batch, chunk_size))


def _build_rounds(batch: VarlenBatch, chunk_size: int) -> list[_Round]:
    C = batch.segment_size
    subs: list[list[tuple[int, int, int, int, int]]] = [[] for _ in batch.chunks]
    for p in batch.pieces:
        for t in range(0, p.length, chunk_size):
            n = min(chunk_size, p.length - t)
            block = p.write_block if t + n == p.length else -1
            subs[p.seq].append((p.tok0 + t, n, p.pos0 + t, p.segment, block))
    out = []
    dev = batch.device
    for r in range(max(len(s) for s in subs)):
        entries = [(i, s[r]) for i, s in enumerate(subs) if r < len(s)]
        L = max(e[1] for _, e in entries)
        tok0 = torch.tensor([e[0] for _, e in entries])
        lens = torch.tensor([e[1] for _, e in entries])
        j = torch.arange(L)
        real = j[None, :] < lens[:, None]
        rows = tok0[:, None] + torch.minimum(j[None, :], lens[:, None] - 1)
        src = real.flatten().nonzero().squeeze(-1)
        ends = [(s, e[4]) for s, (_, e) in enumerate(entries) if e[4] >= 0]
        pos0 = torch.tensor([e[2] for _, e in entries])
        segment = [e[3] for _, e in entries]
        t = [torch.tensor([i for i, _ in entries]), rows, real, rows.flatten()[src], src, pos0 % C, pos0 % C == 0,
             torch.tensor(segment), torch.tensor([s for s, _ in ends], dtype=torch.long),
             torch.tensor([b for _, b in ends], dtype=torch.long)]
        seqs, rows, real, dest, src, offset, fresh, seg, end_rows, end_blocks = (to_device(x, dev) for x in t)
        out.append(_Round(seqs=seqs, rows=rows, real=real, dest=dest, src=src, offset=offset, fresh=fresh,
                          segment=seg, max_segment=max(segment), end_rows=end_rows, end_blocks=end_blocks))
    return out


def _per_v_head(x: torch.Tensor, G: int) -> torch.Tensor:
    """[S, L, H, d] -> [S * HV, L, d] rows for delta_rule_chunk."""
    S, L = x.shape[:2]
    x = x.repeat_interleave(G, dim=2)
    return x.permute(0, 2, 1, 3).reshape(S * x.shape[2], L, x.shape[3])


def core_rounds(
    q: torch.Tensor,  # [T, H, dk] L2-normalised, not scaled
    k: torch.Tensor,  # [T, H, dk]
    v: torch.Tensor,  # [T, HV, dv]
    g: torch.Tensor,  # [T, HV]
    beta: torch.Tensor,  # [T, HV]
    batch: VarlenBatch,
    spec: MCSpec,
    state_pool: torch.Tensor,  # [slots, HV, dv, dk] (a layer's view), read at the slots, then written
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk] (a layer's view), written at the boundaries' blocks
    chunk_size: int = 64,
) -> torch.Tensor:
    """Online readout o [T, HV, dv] (state dtype) of every token: S_t (scale q_t)."""
    T, H, dk = q.shape
    HV, dv = v.shape[1], v.shape[2]
    dt = state_pool.dtype
    scale = dk**-0.5
    work = state_pool[batch.slots]  # [n, HV, dv, dk], a copy
    o = q.new_empty(T, HV, dv, dtype=dt)
    for rd in rounds(batch, chunk_size):
        S, L = rd.rows.shape
        m = rd.real.to(dt)
        qs = _per_v_head(q[rd.rows].to(dt) * scale, HV // H)
        kk = _per_v_head(k[rd.rows].to(dt) * m[..., None, None], HV // H)
        vv = v[rd.rows].to(dt).permute(0, 2, 1, 3).reshape(S * HV, L, dv)
        gg = (g[rd.rows].to(dt) * m[..., None]).transpose(1, 2).reshape(S * HV, L)
        bb = (beta[rd.rows].to(dt) * m[..., None]).transpose(1, 2).reshape(S * HV, L)
        out, st = delta_rule_chunk(qs, kk, vv, gg, bb, work[rd.seqs].reshape(S * HV, dv, dk))
        o[rd.dest] = out.view(S, HV, L, dv).transpose(1, 2).reshape(S * L, HV, dv)[rd.src]
        st = st.view(S, HV, dv, dk)
        if rd.end_rows.numel():
            ckpt_pool[rd.end_blocks] = st[rd.end_rows].to(ckpt_pool.dtype)
            if spec.reset:
                st[rd.end_rows] = 0.0
        work[rd.seqs] = st
    state_pool[batch.slots] = work
    return o


def readout_rounds(
    o: torch.Tensor,  # [T, HV, dv] online readout (core_rounds or the fla core)
    q: torch.Tensor,  # [T, H, dk] L2-normalised, not scaled
    u: torch.Tensor,  # [T, H, dk] router queries
    k: torch.Tensor,  # [T, H, dk]
    key_sum0: torch.Tensor,  # [n, H, dk] each chunk's running key sum before it (slot's, at the start)
    batch: VarlenBatch,
    spec: MCSpec,
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk], this step's checkpoints already written
    ckpt_key_pool: torch.Tensor,  # [blocks, H, dk], this step's segment keys already written
    weights: torch.Tensor | None = None,  # [n, table_width] += router weight of each table entry
    chunk_size: int = 64,
) -> torch.Tensor:
    """MC output y [T, HV, dv] in u's dtype (the state dtype) for every token (the math of kernels/reference.py)."""
    T, H, dk = q.shape
    HV, dv = o.shape[1], o.shape[2]
    G, W = HV // H, batch.table_width
    dt = u.dtype  # the state dtype: o may come from fla in the model's dtype
    C = batch.segment_size
    scale = dk**-0.5
    mid = (batch.start_pos % C != 0)[:, None, None]
    key_run = torch.where(mid, key_sum0.to(dt), 0.0)  # [n, H, dk] running key sum of each chunk
    y = o.to(dt, copy=True)
    cols = torch.arange(W, device=o.device)
    k_max = batch.max_top_k if spec.aggregation == "ssc" else 0  # only SSC's choices can spread thin
    for rd in rounds(batch, chunk_size):
        S, L = rd.rows.shape
        m = rd.real.to(dt)
        base = torch.where(rd.fresh[:, None, None], 0.0, key_run[rd.seqs])
        cum = base[:, None] + (k[rd.rows].to(dt) * m[..., None, None]).cumsum(1)  # [S, L, H, dk]
        key_run[rd.seqs] = cum[:, -1]
        if rd.max_segment == 0:
            continue
        u_r = u[rd.rows].to(dt)
        counts = rd.offset[:, None].to(dt) + torch.arange(1, L + 1, device=o.device, dtype=dt)  # [S, L]
        r_on = (u_r * cum).sum(-1) / counts[..., None]  # [S, L, H]
        tab = batch.table[rd.seqs]  # [S, W]
        valid = (cols[None, :] < rd.segment[:, None]) & (tab >= 0)
        r_c = torch.einsum("slhk,swhk->slhw", u_r, ckpt_key_pool[tab.clamp_min(0)].to(dt))
        if spec.aggregation == "residual":
            chosen = valid[:, None, None, :].expand(S, L, H, W)
            g_on, g_c = torch.ones(S, L, H, dtype=dt, device=o.device), chosen.to(dt)
        else:
            chosen = chosen_mask(spec, r_c.reshape(S * L, H, W), valid.repeat_interleave(L, 0),
                                 batch.top_k[rd.seqs].repeat_interleave(L)).view(S, L, H, W)
            g_on, g_c = mc_gamma(r_on.reshape(S * L, H), r_c.reshape(S * L, H, W), chosen.reshape(S * L, H, W))
            g_on, g_c = g_on.view(S, L, H), g_c.view(S, L, H, W)
        g_c = g_c * m[..., None, None]  # padding rows read nothing
        if weights is not None:
            weights.index_add_(0, rd.seqs, g_c.sum((1, 2)))
        read = chosen & rd.real[..., None, None]
        s_m, w_m = read.any(2).any(1).nonzero(as_tuple=True)  # (row, entry) pairs some token reads
        if k_max and reads_per_token(S, k_max, s_m.numel()):
            mixed = _mix_per_token(ckpt_pool, tab, read, g_c, q[rd.rows].to(dt) * scale, k_max, G)
        else:
            mem = ckpt_pool[tab[s_m, w_m]].to(dt)  # [M, HV, dv, dk]: only what some token reads
            qs = (q[rd.rows].to(dt) * scale).repeat_interleave(G, dim=2)  # [S, L, HV, dk]
            cq = torch.einsum("mvdk,mlvk->mlvd", mem, qs[s_m])  # [M, L, HV, dv]
            gw = g_c[s_m, :, :, w_m].repeat_interleave(G, dim=2)  # [M, L, HV]
            mixed = torch.zeros(S, L, HV, dv, dtype=dt, device=o.device).index_add_(0, s_m, gw[..., None] * cq)
        y_r = g_on.repeat_interleave(G, dim=2)[..., None] * o[rd.rows].to(dt) + mixed
        y[rd.dest] = y_r.reshape(S * L, HV, dv)[rd.src]
    return y


def reads_per_token(rows: int, k_max: int, pairs: int) -> bool:
    """Which of the two readouts is cheaper on a CPU. The union readout multiplies every token of a row
    by every memory some token of that row reads (`pairs` (row, memory) pairs: matmuls over the row's
    tokens, up to tokens x k memories each when the choices spread over many cached checkpoints); the
    per-token one gathers each token's own k_max checkpoints (matrix-vector products, bound by the
    gather's memory traffic). The factor is measured (benchmarks/prefill_scaling.py, small preset,
    one thread): the union is faster up to ~64 distinct memories per row at k=4, the per-token one beyond."""
    return pairs > _UNION_FACTOR * rows * k_max


_UNION_FACTOR = 24
_GATHER_ELEMENTS = 1 << 24  # per slice of tokens in _mix_per_token: 64 MB of fp32 checkpoints


def _mix_per_token(
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk]
    tab: torch.Tensor,  # [S, W] the rows' tables
    read: torch.Tensor,  # [S, L, H, W] bool: the entries each real token reads (at most k_max per head)
    g_c: torch.Tensor,  # [S, L, H, W] their router weights, zero elsewhere
    qs: torch.Tensor,  # [S, L, H, dk] scaled queries
    k_max: int,
    G: int,
) -> torch.Tensor:
    """sum_w g_c[s, l, h, w] * C[tab[s, w], v-heads of h] @ qs[s, l, h] -> [S, L, HV, dv], reading for each
    token only its own chosen checkpoints (cost follows tokens x k, not the union of the row's choices).
    A token's unused slots repeat its first choice with weight 0, and a token that reads nothing gets 0
    whatever its gather read: holes and blocks no token reads (possibly garbage) contribute nothing."""
    S, L, H, W = read.shape
    _, HV, dv, dk = ckpt_pool.shape
    k_max = min(k_max, W)
    pick = torch.topk(read.to(torch.uint8), k_max, dim=-1)  # every read entry; ones not read pad k_max
    on = pick.values.bool()  # [S, L, H, k]
    idx = torch.where(on, pick.indices, pick.indices[..., :1])
    blocks = tab[:, None, None, :].expand(S, L, H, W).gather(-1, idx).clamp_min(0)
    qg = torch.where(on, g_c.gather(-1, idx), 0.0)[..., None] * qs[:, :, :, None, :]  # [S, L, H, k, dk]
    pool = ckpt_pool.view(-1, H, G, dv, dk)
    heads = torch.arange(H, device=tab.device)[None, None, :, None]
    out = torch.empty(S, L, H, G, dv, dtype=qs.dtype, device=qs.device)
    step = max(1, _GATHER_ELEMENTS // max(1, S * H * k_max * G * dv * dk))
    for l0 in range(0, L, step):
        sl = slice(l0, l0 + step)
        mem = pool[blocks[:, sl], heads].to(qs.dtype)  # [S, l, H, k, G, dv, dk]
        out[:, sl] = torch.einsum("slhjgdk,slhjk->slhgd", mem, qg[:, sl])
    out = torch.where(on[..., :1, None], out, 0.0)  # on[..., :1]: the token reads something
    return out.view(S, L, HV, dv)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the glue accumulates in: fp32, or fp64 for an fp64 model (the reference runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_taps(win: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sum_j win[..., j] w[:, j] (+ bias) for windows win [..., D, W], weight [D, W]: the taps added in
    order in acc_dtype, so that every torch conv path (server/model/layers.py's ShortConv over a
    sequence and a step, the decode step's CPU conv, short_conv_rows over packed rows) rounds alike
    on any CPU (a `.sum(-1)` leaves the order to the vectorised kernel)."""
    dt = acc_dtype(win.dtype)
    w = weight.to(dt)
    y = win[..., 0].to(dt) * w[:, 0]
    for j in range(1, w.shape[1]):
        y = y + win[..., j].to(dt) * w[:, j]
    return y if bias is None else y + bias.to(dt)


def short_conv_rows(ext: torch.Tensor, tok_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """The short causal depthwise conv + SiLU of packed chunks. ext [rows, D] is the *extended* layout
    (per chunk its W-1 conv-state rows, then its tokens: server/model/batched_prefill.py), tok_rows [T]
    each token's row in it, weight [D, W], bias [D] -> y [T, D] in ext's dtype:
    silu(sum_j ext[r - W + 1 + j] w[:, j] + bias) in fp32 (fp64 for fp64), taps in order, as
    `ShortConv.forward_seq` (`conv_taps`)."""
    W = weight.shape[1]
    dt = acc_dtype(ext.dtype)
    w = weight.to(dt)
    y = ext[tok_rows - (W - 1)].to(dt) * w[:, 0]
    for j in range(1, W):
        y = y + ext[tok_rows - (W - 1) + j].to(dt) * w[:, j]
    if bias is not None:
        y = y + bias.to(dt)
    return F.silu(y).to(ext.dtype)
