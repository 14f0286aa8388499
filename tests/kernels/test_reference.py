"""The special cases of the Memory Caching math, on the reference (kernels/reference.py, which defines it)."""

from __future__ import annotations

import pytest
import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.reference import reference_mc_gdn
from tests.kernels.inputs import core_inputs, zero_state

SHAPE = dict(H=2, HV=4, dk=7, dv=5)


def run(spec: MCSpec, x, start_pos: int = 0):
    state, key_sum = zero_state(**SHAPE)
    ckpts: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    y = reference_mc_gdn(*x, spec, start_pos, state, key_sum, ckpts, keys)
    return y, state, ckpts, keys


def plain_gdn(q, k, v, g, beta, u):
    """Gated DeltaNet written independently in matrix form: S_t = e^g S (I - b k k^T) + b v k^T."""
    T, H, dk = q.shape
    HV, dv = v.shape[1], v.shape[2]
    G = HV // H
    S = torch.zeros(HV, dv, dk, dtype=q.dtype)
    eye = torch.eye(dk, dtype=q.dtype)
    out = []
    for t in range(T):
        kk = k[t].repeat_interleave(G, 0)  # [HV, dk]
        qq = q[t].repeat_interleave(G, 0) * dk**-0.5
        proj = eye - beta[t][:, None, None] * kk[:, :, None] * kk[:, None, :]
        S = torch.exp(g[t])[:, None, None] * S @ proj + beta[t][:, None, None] * v[t][:, :, None] * kk[:, None, :]
        out.append(torch.einsum("hvk,hk->hv", S, qq))
    return torch.stack(out)


def test_none_is_plain_gdn() -> None:
    x = core_inputs(T=23, **SHAPE, seed=0)
    y, *_ = run(MCSpec("none", 4), x)
    assert torch.allclose(y, plain_gdn(*x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("agg", ["residual", "grm", "soup", "ssc"])
def test_single_segment_is_plain_gdn(agg: str) -> None:
    """With N = 1 segment there is no cached memory: every aggregation reads the online state only."""
    x = core_inputs(T=19, **SHAPE, seed=1)
    y, *_ = run(MCSpec(agg, 64), x)
    assert torch.allclose(y, plain_gdn(*x), atol=1e-12, rtol=1e-10)


def test_residual_reads_the_sum_of_states() -> None:
    x = core_inputs(T=21, **SHAPE, seed=2)
    C = 5
    y, _, ckpts, _ = run(MCSpec("residual", C), x)
    none, *_ = run(MCSpec("none", C), x)
    q = x[0]
    G = SHAPE["HV"] // SHAPE["H"]
    for t in range(21):
        s = t // C
        qq = q[t].repeat_interleave(G, 0) * SHAPE["dk"] ** -0.5
        cached = sum((torch.einsum("hvk,hk->hv", ckpts[i], qq) for i in range(s)), torch.zeros_like(y[t]))
        assert torch.allclose(y[t], none[t] + cached, atol=1e-12)
    # linear memory: reading each memory and summing == reading the summed memory
    t = 20
    summed = sum(ckpts[: t // C]) + torch.zeros_like(ckpts[0])
    qq = q[t].repeat_interleave(G, 0) * SHAPE["dk"] ** -0.5
    assert torch.allclose(y[t] - none[t], torch.einsum("hvk,hk->hv", summed, qq), atol=1e-12)


def test_soup_equals_grm_for_linear_memory() -> None:
    x = core_inputs(T=26, **SHAPE, seed=3)
    soup, *_ = run(MCSpec("soup", 3), x)
    grm, *_ = run(MCSpec("grm", 3), x)
    assert torch.allclose(soup, grm, atol=1e-12)
    none, *_ = run(MCSpec("none", 3), x)
    assert not torch.allclose(grm, none, atol=1e-3)  # the cached memories really contribute


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ssc_with_enough_k_equals_grm(top_k: int) -> None:
    x = core_inputs(T=17, **SHAPE, seed=4)
    C = 4  # 5 segments: tokens of segment s see s cached memories
    ssc, *_ = run(MCSpec("ssc", C, top_k=top_k), x)
    grm, *_ = run(MCSpec("grm", C), x)
    for t in range(17):
        same = torch.allclose(ssc[t], grm[t], atol=1e-12)
        assert same == (t // C <= top_k), (t, top_k)  # equal exactly while top_k >= cached segments


def test_ssc_ties_go_to_lower_segment() -> None:
    """Two cached segments with identical keys: SSC with k=1 must read the earlier one."""
    H, HV, dk, dv = 1, 1, 3, 2
    C = 2
    q = torch.tensor([[[1.0, 0, 0]]] * 5, dtype=torch.float64)
    k = torch.tensor([[[0, 1.0, 0]]] * 5, dtype=torch.float64)
    v = torch.arange(10, dtype=torch.float64).view(5, 1, 2)
    g = torch.zeros(5, 1, dtype=torch.float64)
    beta = torch.full((5, 1), 0.5, dtype=torch.float64)
    u = torch.tensor([[[0, 1.0, 0]]] * 5, dtype=torch.float64)
    state, key_sum = torch.zeros(HV, dv, dk, dtype=torch.float64), torch.zeros(H, dk, dtype=torch.float64)
    ckpts, keys = [], []
    y = reference_mc_gdn(q, k, v, g, beta, u, MCSpec("ssc", C, top_k=1, state_init="reset"), 0, state, key_sum,
                         ckpts, keys)
    assert torch.equal(keys[0], keys[1])
    assert not torch.allclose(ckpts[0], ckpts[1])
    # token 4 (segment 2): online score == cached scores == 1, so gamma = 1/2 each for online and C_0
    qq = q[4, 0] * dk**-0.5
    want = 0.5 * (state[0] @ qq) + 0.5 * (ckpts[0][0] @ qq)
    assert torch.allclose(y[4, 0], want, atol=1e-12)


def test_reset_restarts_each_segment_from_zero() -> None:
    C, T = 6, 20
    x = core_inputs(T=T, **SHAPE, seed=5)
    y_reset, s_reset, ck_reset, _ = run(MCSpec("none", C, state_init="reset"), x)
    y_cont, _, ck_cont, _ = run(MCSpec("none", C), x)
    for s in range(T // C + 1):
        seg = slice(s * C, min(T, (s + 1) * C))
        fresh, *_ = run(MCSpec("none", C), tuple(t[seg] for t in x))
        assert torch.allclose(y_reset[seg], fresh, atol=1e-12)  # reset == a fresh run on the segment alone
        if s == 0:
            assert torch.allclose(y_cont[seg], fresh, atol=1e-12)
        else:
            assert not torch.allclose(y_cont[seg], fresh, atol=1e-6)  # continue carries history
    # checkpoints: reset caches each segment's own final state; continue the running state
    for i in range(T // C):
        seg = slice(i * C, (i + 1) * C)
        _, fresh_state, *_ = run(MCSpec("none", C), tuple(t[seg] for t in x))
        assert torch.allclose(ck_reset[i], fresh_state, atol=1e-12)
    assert torch.allclose(ck_cont[-1], run(MCSpec("none", C), tuple(t[: (T // C) * C] for t in x))[1], atol=1e-12)
    assert torch.count_nonzero(s_reset) > 0 and T % C != 0  # ended mid-segment, state is live


def test_segment_key_is_mean_of_keys() -> None:
    C = 5
    x = core_inputs(T=11, **SHAPE, seed=6)
    _, _, _, keys = run(MCSpec("grm", C), x)
    assert len(keys) == 2
    assert torch.allclose(keys[1], x[1][5:10].mean(0), atol=1e-14)
