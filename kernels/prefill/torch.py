"""Chunked prefill of one Gated DeltaNet + Memory Caching layer core, in pure torch.

The prompt is processed segment by segment; inside a segment, chunks of up to `chunk_size`
tokens use the closed (WY / UT-transform) form of the gated delta rule instead of a loop per
token. At every segment boundary a checkpoint and a segment key are produced.

Within a chunk with cumulative log-decay G_t and deltas d_t = beta_t (v_t - e^{G_t} S_0 k_t
- sum_{i<t} e^{G_t - G_i} (k_i.k_t) d_i):
    (I + diag(beta) A) D = diag(beta) (V - e^G * K S_0^T),  A[t,i] = e^{G_t-G_i} k_t.k_i (i < t)
    o_t = e^{G_t} S_0 q_t + sum_{i<=t} e^{G_t-G_i} (k_i.q_t) d_i
    S_L = e^{G_L} S_0 + sum_i e^{G_L-G_i} d_i k_i^T
"""

from __future__ import annotations

import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.router import chosen_mask, mc_gamma


def delta_rule_chunk(
    qs: torch.Tensor,  # [R, L, dk] scaled queries (R: any rows, e.g. heads or batch x heads)
    k: torch.Tensor,  # [R, L, dk]
    v: torch.Tensor,  # [R, L, dv]
    g: torch.Tensor,  # [R, L]
    beta: torch.Tensor,  # [R, L]
    state: torch.Tensor,  # [R, dv, dk]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the gated delta rule in closed form (module docstring): (o [R, L, dv], new state)."""
    L = qs.shape[1]
    cum = g.cumsum(-1)  # [HV, L]
    diff = cum[:, :, None] - cum[:, None, :]  # [HV, L(t), L(i)] = G_t - G_i
    ones = torch.ones(L, L, dtype=torch.bool, device=qs.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)
    decay_strict = torch.exp(diff.masked_fill(~strict, float("-inf")))
    decay_incl = torch.exp(diff.masked_fill(~incl, float("-inf")))
    e_cum = torch.exp(cum)[..., None]  # [HV, L, 1]
    st = state.transpose(-1, -2)  # [HV, dk, dv]
    a = (k @ k.transpose(-1, -2)) * decay_strict
    rhs = beta[..., None] * (v - e_cum * (k @ st))
    m = torch.eye(L, dtype=qs.dtype, device=qs.device) + beta[..., None] * a
    d = torch.linalg.solve_triangular(m, rhs, upper=False, unitriangular=True)  # [HV, L, dv]
    o = e_cum * (qs @ st) + ((qs @ k.transpose(-1, -2)) * decay_incl) @ d
    tail = torch.exp(cum[:, -1:] - cum)[..., None]  # [HV, L, 1]
    new_state = torch.exp(cum[:, -1])[:, None, None] * state + (d * tail).transpose(-1, -2) @ k
    return o, new_state


def chunked_mc_gdn(
    q: torch.Tensor,  # [T, H, dk], L2-normalised, not scaled
    k: torch.Tensor,  # [T, H, dk]
    v: torch.Tensor,  # [T, HV, dv]
    g: torch.Tensor,  # [T, HV]
    beta: torch.Tensor,  # [T, HV]
    u: torch.Tensor,  # [T, H, dk]
    spec: MCSpec,
    start_pos: int,
    state: torch.Tensor,  # [HV, dv, dk]
    key_sum: torch.Tensor,  # [H, dk]
    ckpts: torch.Tensor,  # [N, HV, dv, dk], N = start_pos // C cached memories (checkpoint dtype);
    # not read (may be empty) when spec.aggregation is none
    ckpt_keys: torch.Tensor,  # [N, H, dk]
    ckpt_valid: torch.Tensor | None = None,  # [N] bool, False for dropped checkpoints
    chunk_size: int = 64,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Returns (y [T, HV, dv], state, key_sum, [(checkpoint, key) for each boundary crossed],
    router weight [N + B] summed over tokens and heads: each of the N given checkpoints, then each of
    the B made here (read by this call's later tokens); zeros when the aggregation reads no cache)."""
    T, H, dk = q.shape
    HV, dv = v.shape[1], v.shape[2]
    G = HV // H
    C = spec.segment_size
    dt = state.dtype
    scale = dk**-0.5

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.to(dt).transpose(0, 1)

    qv = heads_first(q.repeat_interleave(G, dim=1) * scale)  # [HV, T, dk]
    kv = heads_first(k.repeat_interleave(G, dim=1))
    vv, gv, bv = heads_first(v), heads_first(g), heads_first(beta)
    n_given = n = ckpts.shape[0]
    n_total = n_given + (start_pos + T) // C - start_pos // C
    if spec.reads_cache:
        assert n_given == start_pos // C, (ckpts.shape, start_pos, C)
        cached = q.new_empty(n_total, HV, dv, dk, dtype=dt)  # given memories, then those made here
        keys = q.new_empty(n_total, H, dk, dtype=dt)
        valid = torch.ones(n_total, dtype=torch.bool, device=q.device)
        cached[:n_given], keys[:n_given] = ckpts, ckpt_keys
        if ckpt_valid is not None:
            valid[:n_given] = ckpt_valid
    weights = torch.zeros(n_total, dtype=dt, device=q.device)
    new_ckpts: list[tuple[torch.Tensor, torch.Tensor]] = []
    ys = []
    t = 0
    while t < T:
        pos = start_pos + t
        end = min(T, t + chunk_size, t + (C - pos % C))  # never cross a segment boundary
        o, state = delta_rule_chunk(qv[:, t:end], kv[:, t:end], vv[:, t:end], gv[:, t:end], bv[:, t:end], state)
        o = o.transpose(0, 1)  # [L, HV, dv]
        kc = k[t:end].to(dt)
        cum_keys = key_sum + kc.cumsum(0)  # [L, H, dk]
        key_sum = cum_keys[-1].clone()
        if spec.reads_cache and n > 0:
            o, w = _mix(o, qv[:, t:end].transpose(0, 1), u[t:end].to(dt), cum_keys, pos % C, cached[:n], keys[:n],
                        valid[:n], spec, top_k, G)
            weights[:n] += w
        ys.append(o)
        if (start_pos + end) % C == 0:
            ckpt = state.to(ckpts.dtype)
            key = key_sum / C
            new_ckpts.append((ckpt, key))
            if spec.reads_cache:
                cached[n], keys[n] = ckpt, key
                n += 1
            key_sum = torch.zeros_like(key_sum)
            if spec.reset:
                state = torch.zeros_like(state)
        t = end
    y = torch.cat(ys) if ys else q.new_zeros(0, HV, dv, dtype=dt)
    return y, state, key_sum, new_ckpts, weights


def _mix(
    o: torch.Tensor,  # [L, HV, dv] online readout
    qs: torch.Tensor,  # [L, HV, dk] scaled queries
    u: torch.Tensor,  # [L, H, dk]
    cum_keys: torch.Tensor,  # [L, H, dk] running key sums of the current segment
    offset: int,  # position of the first row inside its segment
    cached: torch.Tensor,  # [N, HV, dv, dk]
    keys: torch.Tensor,  # [N, H, dk]
    valid: torch.Tensor,  # [N]
    spec: MCSpec,
    top_k: int | None,
    G: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed output [L, HV, dv] and the router weight each cached memory received [N].

    Only the memories some row of the chunk actually reads are multiplied out (SSC's top-k union;
    all valid ones otherwise), so the cost follows what is read, not how many are cached."""
    L, N = o.shape[0], cached.shape[0]
    H = u.shape[1]
    if spec.aggregation == "residual":
        cols = valid.nonzero().squeeze(-1)
        cq = torch.einsum("nvdk,lvk->lnvd", cached[cols], qs)  # [L, n, HV, dv]
        return o + cq.sum(1), valid.to(o.dtype) * (L * H)
    counts = torch.arange(offset + 1, offset + L + 1, device=o.device, dtype=o.dtype)
    r_online = (u * cum_keys).sum(-1) / counts[:, None]  # [L, H]
    r_cached = torch.einsum("lhk,nhk->lhn", u, keys)
    chosen = chosen_mask(spec, r_cached, valid[None, :].expand(L, N), top_k)
    g_on, g_c = mc_gamma(r_online, r_cached, chosen)  # [L, H], [L, H, N]
    cols = chosen.flatten(0, 1).any(0).nonzero().squeeze(-1)  # memories read by some row and head
    cq = torch.einsum("nvdk,lvk->lnvd", cached[cols], qs)  # [L, n, HV, dv]
    g_used = g_c[..., cols].repeat_interleave(G, dim=1)  # [L, HV, n]
    y = g_on.repeat_interleave(G, dim=1)[..., None] * o + torch.einsum("lvn,lnvd->lvd", g_used, cq)
    return y, g_c.sum((0, 1))
