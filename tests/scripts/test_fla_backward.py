"""Our replacement for fla's gated chunk_bwd_dqkwg (mctrain.fla_backward) against autograd of a direct
fp64 computation of the same chunk recurrence, at odd sizes: partial last chunks, varlen, K != V, GVA,
both state layouts."""

from __future__ import annotations

import math

import pytest
import torch
from mctrain.fla_backward import chunk_bwd_dqkwg_torch

from tests.server.model.helpers import rel_err


def chunk_ranges(B, T, L, cu_seqlens):
    """(start, end) flat token ranges of the chunks, in fla's h order."""
    seqs = [(b * T, b * T + T) for b in range(B)] if cu_seqlens is None else list(zip(cu_seqlens[:-1],
                                                                                          cu_seqlens[1:], strict=True))
    return [(s, min(s + L, e)) for s0, e in seqs for s in range(s0, e, L)]


def reference(q, k, v, do, h, dh, w, g, dv, scale, L, state_v_first, cu_seqlens):
    """Autograd of the chunk function chunk_bwd_dqkwg differentiates (its docstring), chunk by chunk and
    head by head in fp64; g in log2 units as fla passes it, the gradient for G = g ln 2."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    flat = [x.double().reshape(B * T, *x.shape[2:]) for x in (q, k, v, do, w, dv)]
    qf, kf, wf = (x.detach().requires_grad_() for x in (flat[0], flat[1], flat[4]))
    vf, dof, dvf = flat[2], flat[3], flat[5]
    G = (g.double().reshape(B * T, HV) * math.log(2)).requires_grad_()
    hs, dhs = (x.double().reshape(-1, HV, *x.shape[-2:]) for x in (h, dh))
    if not state_v_first:
        hs, dhs = hs.transpose(-1, -2), dhs.transpose(-1, -2)  # [N, HV, V, K]
    loss = 0
    for c, (s0, s1) in enumerate(chunk_ranges(B, T, L, cu_seqlens)):
        for i in range(HV):
            qq, kk, ww = qf[s0:s1, i // (HV // H)], kf[s0:s1, i // (HV // H)], wf[s0:s1, i]
            vv, dd, dvv, gg = vf[s0:s1, i], dof[s0:s1, i], dvf[s0:s1, i], G[s0:s1, i]
            S, dS = hs[c, i], dhs[c, i]  # [V, K]
            n = s1 - s0
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            decay = torch.exp(torch.where(causal, gg[:, None] - gg[None, :], -math.inf))
            o = scale * (torch.exp(gg)[:, None] * (qq @ S.T) + (decay * (qq @ kk.T)) @ vv)
            s_end = torch.exp(gg[-1]) * S + (vv * torch.exp(gg[-1] - gg)[:, None]).T @ kk
            loss = loss + (dd * o).sum() + (dS * s_end).sum() - (dvv * (ww @ S.T)).sum()
    dq, dk, dw, dg = torch.autograd.grad(loss, [qf, kf, wf, G])
    return dq.view(q.shape), dk.view(k.shape), dw.view(w.shape), dg.view(g.shape)


def inputs(B, T, H, HV, K, V, L, state_v_first, cu_seqlens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n_chunks = len(chunk_ranges(B, T, L, cu_seqlens))
    q, k = (torch.nn.functional.normalize(rand(B, T, H, K), dim=-1) for _ in range(2))
    v, do, dv = (rand(B, T, HV, V) for _ in range(3))
    w = rand(B, T, HV, K) * 0.3
    step = -torch.nn.functional.softplus(rand(B * T, HV)) * 0.2  # per-token log-decay, natural units
    g = torch.zeros(B * T, HV, dtype=torch.float64)
    for s0, s1 in chunk_ranges(B, T, L, cu_seqlens):
        g[s0:s1] = step[s0:s1].cumsum(0)  # cumulated within each chunk, as fla hands it over
    g = (g / math.log(2)).view(B, T, HV)  # fla's log2 units
    state_shape = (V, K) if state_v_first else (K, V)
    h, dh = (rand(1 if cu_seqlens else B, n_chunks // (1 if cu_seqlens else B), HV, *state_shape) for _ in range(2))
    cast = [x.to(dtype) for x in (q, k, v, do, h, dh, w, dv)]
    return (*cast, g.float() if dtype != torch.float64 else g)


CASES = {
    # name: B, T, H, HV, K, V, chunk, state_v_first, cu_seqlens
    "gva-partial-chunk": (2, 100, 2, 4, 48, 80, 64, True, None),
    "small-chunks-k-first": (3, 37, 3, 3, 24, 20, 16, False, None),
    "varlen-gva": (1, 203, 1, 2, 40, 56, 32, True, [0, 37, 150, 203]),
    "one-token-chunk": (2, 65, 2, 2, 16, 24, 64, True, None),  # the last chunk holds a single token
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_autograd(case):
    B, T, H, HV, K, V, L, vf, cu = CASES[case]
    q, k, v, do, h, dh, w, dv, g = inputs(B, T, H, HV, K, V, L, vf, cu, torch.float64, seed=len(case))
    scale = K**-0.5
    cu_t = None if cu is None else torch.tensor(cu)
    got = chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=w, g=g, dv=dv, scale=scale, state_v_first=vf,
                                cu_seqlens=cu_t, chunk_size=L)
    want = reference(q, k, v, do, h, dh, w, g, dv, scale, L, vf, cu)
    for name, a, b in zip(("dq", "dk", "dw", "dg"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float64, (name, a.shape, b.shape, a.dtype)
        assert rel_err(a, b) < 1e-12, (case, name, rel_err(a, b))


def test_varlen_chunk_indices_given_equal_derived():
    B, T, H, HV, K, V, L, vf, cu = CASES["varlen-gva"]
    q, k, v, do, h, dh, w, dv, g = inputs(B, T, H, HV, K, V, L, vf, cu, torch.float64, seed=7)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    idx = torch.tensor([[i, c] for i, n in enumerate(lens) for c in range(-(-n // L))], dtype=torch.int32)
    kw = dict(w=w, g=g, dv=dv, scale=0.3, state_v_first=vf, cu_seqlens=torch.tensor(cu), chunk_size=L)
    for a, b in zip(chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, **kw),
                    chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, chunk_indices=idx, **kw), strict=True):
        assert torch.equal(a, b)


def test_bf16_inputs_keep_fla_dtypes_and_tolerance():
    """The training path's dtypes: bf16 q, k, v, h, dh, w, dv; fp32 g. Results in fla's dtypes, and
    within bf16 rounding of the fp64 truth computed from the same (rounded) inputs; no w -> no dw."""
    B, T, H, HV, K, V, L, vf, cu = CASES["gva-partial-chunk"]
    q, k, v, do, h, dh, w, dv, g = inputs(B, T, H, HV, K, V, L, vf, cu, torch.bfloat16, seed=3)
    dq, dk, dw, dg = chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=None, g=g, dv=None, scale=K**-0.5,
                                           state_v_first=vf, chunk_size=L)
    assert (dq.dtype, dk.dtype, dw, dg.dtype) == (torch.bfloat16, torch.bfloat16, None, torch.float32)
    want = reference(q, k, v, do, h, dh, w, g, torch.zeros_like(dv), K**-0.5, L, vf, cu)
    for name, a, b in zip(("dq", "dk", "dg"), (dq, dk, dg), (want[0], want[1], want[3]), strict=True):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))  # bf16 output rounding: ~2^-9


def test_refuses_what_it_does_not_implement():
    q, k, v, do, h, dh, w, dv, g = inputs(1, 8, 1, 1, 4, 4, 4, True, None, torch.float64, seed=0)
    with pytest.raises(NotImplementedError):
        chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=w, g=None, dv=dv, state_v_first=True, chunk_size=4)
