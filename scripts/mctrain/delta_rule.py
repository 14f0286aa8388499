"""The gated delta rule over a batch of sequences, differentiable: fla's Triton kernel on GPU, torch elsewhere.

Both take fla's layout: q, k [B, T, H, dk] (already L2-normalised, not scaled), v [B, T, HV, dv],
g (log-decay), beta [B, T, HV] and an optional initial state [B, HV, dv, dk] (fla's `state_v_first`);
both return (o [B, T, HV, dv] with o_t = S_t (scale q_t), final state [B, HV, dv, dk] fp32).
The torch path (`delta_rule_chunks`) runs kernels/prefill/torch.py's closed-form chunk math over batch x heads
rows, with all that does not depend on the state done for every chunk at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    o, ends = delta_rule_chunks(q, k, v, g, beta, scale, initial_state, chunk_size)
    return o, ends[:, -1]


def delta_rule_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      scale: float, initial_state: torch.Tensor | None, chunk: int, reset_every: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunks of `chunk` tokens: (o [B, T, HV, dv], the state at the end of
    every chunk [B, Nc, HV, dv, dk] fp32). With reset_every (a multiple of chunk) the state restarts
    from zero at those positions (MC's `reset`); the end states are taken before the reset.

    Everything that does not depend on the state runs for all chunks at once (kernels/prefill/torch.py's
    closed form, with the triangular solve split: D = U - W S^T, U = M^-1 diag(beta) V, W = M^-1
    diag(beta) e^G K); only D and S_{c+1} = e^{G_L} S_c + D^T (e^{G_L - G} K) run chunk by chunk, a
    few kernels each instead of the closed form's ~25, since the training step is launch-bound."""
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    G, L = HV // H, chunk
    assert reset_every % L == 0, (reset_every, L)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    nc = -(-T // L)
    R = B * HV

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, T, HV, ...] -> [Nc, B*HV, L, ...], zero past T
        x = x.to(dt)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, nc * L - T))
        x = x.view(B, nc, L, HV, *x.shape[3:]).movedim(1, 0).transpose(2, 3)  # [Nc, B, HV, L, ...]
        return x.reshape(nc, R, L, *x.shape[4:])  # rows b * HV + h, as `state` has them

    # zero padding is the identity step: beta 0 writes nothing, g 0 decays nothing
    qs = rows(q.repeat_interleave(G, dim=2) * scale)  # [Nc, R, L, dk]
    kk = rows(k.repeat_interleave(G, dim=2))
    vv, gg, bb = rows(v), rows(g), rows(beta)  # [Nc, R, L, dv], [Nc, R, L]
    cum = gg.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]  # [Nc, R, L(t), L(i)] = G_t - G_i
    ones = torch.ones(L, L, dtype=torch.bool, device=q.device)
    decay_strict = torch.exp(diff.masked_fill(~torch.tril(ones, -1), float("-inf")))
    decay_incl = torch.exp(diff.masked_fill(~torch.tril(ones), float("-inf")))
    e_cum = torch.exp(cum)[..., None]
    m = torch.eye(L, dtype=dt, device=q.device) + bb[..., None] * ((kk @ kk.transpose(-1, -2)) * decay_strict)
    rhs = torch.cat([bb[..., None] * vv, bb[..., None] * e_cum * kk], dim=-1)
    u, w = torch.linalg.solve_triangular(m, rhs, upper=False, unitriangular=True).split([dv, dk], dim=-1)
    p = (qs @ kk.transpose(-1, -2)) * decay_incl  # [Nc, R, L, L]
    kt = kk * torch.exp(cum[..., -1:] - cum)[..., None]  # keys decayed to the chunk's end
    g_end = torch.exp(cum[..., -1])[..., None, None]  # [Nc, R, 1, 1]
    zero = torch.zeros(R, dv, dk, dtype=dt, device=q.device)
    state = zero if initial_state is None else initial_state.to(dt).reshape(R, dv, dk)
    starts, ds, ends = [], [], []
    # unbind, not u[c]: one backward node stacks the chunks' gradients (a select per chunk would
    # write a full-size zero tensor per chunk)
    for c, (uc, wc, kc, gc) in enumerate(zip(u.unbind(0), w.unbind(0), kt.unbind(0), g_end.unbind(0), strict=True)):
        if reset_every and c > 0 and c * L % reset_every == 0:
            state = zero
        starts.append(state)
        d = uc - wc @ state.transpose(-1, -2)  # [R, L, dv]
        state = gc * state + d.transpose(-1, -2) @ kc
        ds.append(d)
        ends.append(state)
    s0 = torch.stack(starts)  # [Nc, R, dv, dk]
    o = e_cum * (qs @ s0.transpose(-1, -2)) + p @ torch.stack(ds)  # [Nc, R, L, dv]
    o = o.view(nc, B, HV, L, dv).permute(1, 0, 3, 2, 4).reshape(B, nc * L, HV, dv)[:, :T]
    return o, torch.stack(ends).view(nc, B, HV, dv, dk).transpose(0, 1)
