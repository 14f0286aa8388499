"""Token-by-token reference of one Gated DeltaNet + Memory Caching layer core.

Written for clarity, not speed, this is the definition of the math: the other paths (chunked
prefill, batched decode, Triton) are tested against it, in float64. One sequence; inputs are what
the layer computes after its projections, short convolutions and activations.
"""

from __future__ import annotations

import torch

from mcserve.kernels.mc_spec import MCSpec


def reference_mc_gdn(
    q: torch.Tensor,  # [T, H, dk], L2-normalised, not yet scaled
    k: torch.Tensor,  # [T, H, dk], L2-normalised
    v: torch.Tensor,  # [T, HV, dv]
    g: torch.Tensor,  # [T, HV] log-decay (<= 0)
    beta: torch.Tensor,  # [T, HV]
    u: torch.Tensor,  # [T, H, dk] router queries
    spec: MCSpec,
    start_pos: int,
    state: torch.Tensor,  # [HV, dv, dk], updated in place
    key_sum: torch.Tensor,  # [H, dk] sum of the current segment's keys so far, updated in place
    ckpts: list[torch.Tensor],  # C_i, each [HV, dv, dk]; appended to at boundaries
    ckpt_keys: list[torch.Tensor],  # p_i, each [H, dk]; appended to at boundaries
    ckpt_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Returns y [T, HV, dv] (the layer output before o_norm), in the state's dtype."""
    T, H, dk = q.shape
    HV = v.shape[1]
    G = HV // H
    C = spec.segment_size
    scale = dk**-0.5
    dt = state.dtype
    ys = []
    for t in range(T):
        pos = start_pos + t
        seg = pos // C
        assert len(ckpts) == seg, (len(ckpts), seg)
        qt, kt, vt, ut = q[t].to(dt), k[t].to(dt), v[t].to(dt), u[t].to(dt)
        for hv in range(HV):
            kh = kt[hv // G]
            state[hv] *= torch.exp(g[t, hv].to(dt))
            err = vt[hv] - state[hv] @ kh
            state[hv] += beta[t, hv].to(dt) * torch.outer(err, kh)
        key_sum += kt
        count = pos % C + 1

        y = torch.zeros(HV, v.shape[2], dtype=dt)
        cached = [c.to(dt) for c in ckpts]
        for h in range(H):
            qh = qt[h] * scale
            heads = range(h * G, (h + 1) * G)
            if spec.aggregation == "none":
                for hv in heads:
                    y[hv] = state[hv] @ qh
                continue
            if spec.aggregation == "residual":
                for hv in heads:
                    y[hv] = state[hv] @ qh + sum((c[hv] @ qh for c in cached), torch.zeros_like(y[hv]))
                continue
            r_online = ut[h] @ (key_sum[h] / count)
            r_cached = [ut[h] @ p[h].to(dt) for p in ckpt_keys]
            chosen = list(range(seg))
            if spec.aggregation == "ssc":
                # highest score first; ties go to the lower segment index
                chosen = sorted(chosen, key=lambda i: (-float(r_cached[i]), i))[: spec.top_k]
            logits = torch.stack([r_online] + [r_cached[i] for i in chosen])
            gamma = torch.softmax(logits, dim=0)
            for hv in heads:
                if spec.aggregation == "soup":
                    # average the memories' parameters, then read once
                    mem = gamma[0] * state[hv]
                    for j, i in enumerate(chosen):
                        mem = mem + gamma[j + 1] * cached[i][hv]
                    y[hv] = mem @ qh
                else:
                    acc = gamma[0] * (state[hv] @ qh)
                    for j, i in enumerate(chosen):
                        acc = acc + gamma[j + 1] * (cached[i][hv] @ qh)
                    y[hv] = acc
        ys.append(y)

        if pos % C == C - 1:
            ckpts.append(state.clone().to(ckpt_dtype or dt))
            ckpt_keys.append(key_sum / C)
            key_sum.zero_()
            if spec.reset:
                state.zero_()
    return torch.stack(ys) if ys else torch.zeros(0, HV, v.shape[2], dtype=dt)
