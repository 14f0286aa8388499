"""The gated delta rule over a batch of sequences, differentiable: fla's Triton kernel on GPU, torch elsewhere.

Both take fla's layout: q, k [B, T, H, dk] (already L2-normalised, not scaled), v [B, T, HV, dv],
g (log-decay), beta [B, T, HV] and an optional initial state [B, HV, dv, dk] (fla's `state_v_first`);
both return (o [B, T, HV, dv] with o_t = S_t (scale q_t), final state [B, HV, dv, dk] fp32).
The torch path runs kernels/prefill/torch.py's closed-form chunk over batch x heads rows.
"""

from __future__ import annotations

import torch

from mcserve.kernels.prefill.torch import delta_rule_chunk

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
        o, state = delta_rule_chunk(qs[:, t:e], kk[:, t:e], vv[:, t:e], gg[:, t:e], bb[:, t:e], state)
        outs.append(o)
    o = torch.cat(outs, dim=1) if outs else vv.new_zeros(B * HV, 0, dv)
    return o.view(B, HV, T, dv).transpose(1, 2), state.view(B, HV, dv, dk)
