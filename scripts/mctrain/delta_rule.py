"""The gated delta rule over a batch of sequences, differentiable: fla's Triton kernel on GPU, torch elsewhere.

Both take fla's layout: q, k [B, T, H, dk] (already L2-normalised, not scaled), v [B, T, HV, dv],
g (log-decay), beta [B, T, HV] and an optional initial state [B, HV, dv, dk] (fla's `state_v_first`);
both return (o [B, T, HV, dv] with o_t = S_t (scale q_t), final state [B, HV, dv, dk] fp32).
The torch path is the chunked (WY) form of kernels/chunked.py with a batch dimension.
"""

from __future__ import annotations

import torch

BACKENDS = ("torch", "fla")


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               scale: float, initial_state: torch.Tensor | None, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "fla":
        return _fla(q, k, v, g, beta, scale, initial_state)
    if backend == "torch":
        return delta_rule_torch(q, k, v, g, beta, scale, initial_state)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _fla(q, k, v, g, beta, scale, initial_state):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    # q, k, v and beta in the activation dtype (bf16 under autocast), g and the state in fp32,
    # as fla's own GatedDeltaNet layer feeds the kernel; all in-kernel preprocessing off, since
    # the model's `heads()` already normalised q, k and computed g and beta.
    dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    o, final = chunk_gated_delta_rule(
        q.to(dt), k.to(dt), v.to(dt), g.float(), beta.to(dt),
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
        use_beta_sigmoid_in_kernel=False,
        state_v_first=True,
    )
    return o, final


def delta_rule_torch(q, k, v, g, beta, scale, initial_state, chunk_size: int = 64):
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    G = HV // H
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, T, HV, ...] -> [B*HV, T, ...]
        return x.to(dt).transpose(1, 2).reshape(B * HV, T, *x.shape[3:])

    qs = rows(q.repeat_interleave(G, dim=2) * scale)
    kk = rows(k.repeat_interleave(G, dim=2))
    vv, gg, bb = rows(v), rows(g), rows(beta)
    state = (torch.zeros(B * HV, dv, dk, dtype=dt, device=q.device) if initial_state is None
             else initial_state.to(dt).reshape(B * HV, dv, dk))
    outs = []
    for t in range(0, T, chunk_size):
        e = min(T, t + chunk_size)
        o, state = _chunk(qs[:, t:e], kk[:, t:e], vv[:, t:e], gg[:, t:e], bb[:, t:e], state)
        outs.append(o)
    o = torch.cat(outs, dim=1) if outs else vv.new_zeros(B * HV, 0, dv)
    return o.view(B, HV, T, dv).transpose(1, 2), state.view(B, HV, dv, dk)


def _chunk(qs, k, v, g, beta, state):
    """One chunk for R = B*HV rows: qs, k [R, L, dk], v [R, L, dv], g, beta [R, L], state [R, dv, dk].

    With cumulative log-decay G_t and A[t, i] = e^{G_t - G_i} k_t.k_i (i < t), the deltas solve
    (I + diag(beta) A) D = diag(beta) (V - e^G K S0^T); then o_t = e^{G_t} S0 q_t + sum_{i<=t}
    e^{G_t - G_i} (k_i.q_t) d_i and S_L = e^{G_L} S0 + sum_i e^{G_L - G_i} d_i k_i^T.
    """
    L = qs.shape[1]
    cum = g.cumsum(-1)  # [R, L]
    diff = cum[:, :, None] - cum[:, None, :]  # [R, L(t), L(i)]
    ones = torch.ones(L, L, dtype=torch.bool, device=qs.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)
    # masked_fill before exp: above the diagonal diff > 0 and could overflow
    decay_strict = torch.exp(diff.masked_fill(~strict, float("-inf")))
    decay_incl = torch.exp(diff.masked_fill(~incl, float("-inf")))
    e_cum = torch.exp(cum)[..., None]  # [R, L, 1]
    st = state.transpose(-1, -2)  # [R, dk, dv]
    a = (k @ k.transpose(-1, -2)) * decay_strict
    rhs = beta[..., None] * (v - e_cum * (k @ st))
    m = torch.eye(L, dtype=qs.dtype, device=qs.device) + beta[..., None] * a
    d = torch.linalg.solve_triangular(m, rhs, upper=False, unitriangular=True)  # [R, L, dv]
    o = e_cum * (qs @ st) + ((qs @ k.transpose(-1, -2)) * decay_incl) @ d
    tail = torch.exp(cum[:, -1:] - cum)[..., None]  # [R, L, 1]
    new_state = torch.exp(cum[:, -1])[:, None, None] * state + (d * tail).transpose(-1, -2) @ k
    return o, new_state
