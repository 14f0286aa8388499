"""The batched training forward equals the serving model's token-by-token reference."""

from __future__ import annotations

import pytest
import torch
from mctrain.delta_rule import delta_rule_chunks, delta_rule_torch
from mctrain.mc_forward import forward_logits, mc_core

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.torch import chunked_mc_gdn, delta_rule_chunk
from tests.server.model.helpers import VOCAB, rel_err, tiny_model

MC_CASES = {
    "none": dict(aggregation="none", segment_size=8),
    "ssc": dict(aggregation="ssc", segment_size=8, top_k=2, router="learned"),
    "ssc-reset-query": dict(aggregation="ssc", segment_size=7, top_k=1, state_init="reset"),
    "grm": dict(aggregation="grm", segment_size=8, router="learned"),
    "residual": dict(aggregation="residual", segment_size=8),
}


@pytest.mark.parametrize("case", list(MC_CASES))
def test_batched_forward_matches_reference_fp64(case):
    model = tiny_model(MC_CASES[case], seed=3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 37), generator=gen)  # 37: a partial last segment and chunk
    got = forward_logits(model, ids, backend="torch").detach()
    for b in range(ids.shape[0]):
        want = model.forward_reference(ids[b])
        # 1e-7, not fp64's 1e-15: both compute the short convolutions in fp32 (as ShortConv does),
        # summed in a different order; a wrong router or gamma shows as > 1e-2
        assert rel_err(got[b], want) < 1e-7, (case, b, rel_err(got[b], want))


def test_batched_forward_matches_reference_fp32_gva():
    model = tiny_model(MC_CASES["ssc"], seed=5, dtype=torch.float32, num_v_heads=4, expand_v=1.0)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    got = forward_logits(model, ids, backend="torch").detach()
    for b in range(2):
        assert rel_err(got[b], model.forward_reference(ids[b])) < 1e-4


def test_core_matches_chunked_prefill_kernel_and_chunks_agree():
    """The batched core (70 tokens: two 64-token chunks in the first call) against kernels/prefill/torch.py."""
    gen = torch.Generator().manual_seed(2)
    B, T, H, HV, dk, dv = 2, 70, 2, 4, 8, 6
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=gen, dtype=torch.float64), dim=-1)
    u = torch.randn(B, T, H, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, HV, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    spec = MCSpec("ssc", segment_size=16, top_k=2)
    y = mc_core(q, k, v, g, beta, u, spec, "torch")
    for b in range(B):
        f64 = dict(dtype=torch.float64)
        state, key_sum = torch.zeros(HV, dv, dk, **f64), torch.zeros(H, dk, **f64)
        no_ckpts, no_keys = torch.zeros(0, HV, dv, dk, **f64), torch.zeros(0, H, dk, **f64)
        want, *_ = chunked_mc_gdn(q[b], k[b], v[b], g[b], beta[b], u[b], spec, 0, state, key_sum, no_ckpts, no_keys)
        assert rel_err(y[b], want) < 1e-10
    o_small, s_small = delta_rule_torch(q, k, v, g, beta, dk**-0.5, None, chunk_size=5)
    o_big, s_big = delta_rule_torch(q, k, v, g, beta, dk**-0.5, None, chunk_size=64)
    assert rel_err(o_small, o_big) < 1e-10 and rel_err(s_small, s_big) < 1e-10


def test_gradients_reach_router_and_all_weights():
    model = tiny_model(MC_CASES["ssc"], seed=1, dtype=torch.float32).train()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    logits = forward_logits(model, ids[:, :-1], backend="torch")
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _closed_form_by_chunk(q, k, v, g, beta, scale, state, L, reset_every):
    """Reference: kernels/prefill/torch.py's closed-form chunk, one chunk at a time. [B, T, HV, dv], ends."""
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    G = HV // H

    def rows(x):
        return x.transpose(1, 2).reshape(B * HV, T, *x.shape[3:])

    qs, kk = rows(q.repeat_interleave(G, dim=2) * scale), rows(k.repeat_interleave(G, dim=2))
    vv, gg, bb = rows(v), rows(g), rows(beta)
    state = state.reshape(B * HV, dv, dk)
    outs, ends = [], []
    for t in range(0, T, L):
        if reset_every and t > 0 and t % reset_every == 0:
            state = torch.zeros_like(state)
        o, state = delta_rule_chunk(qs[:, t:t + L], kk[:, t:t + L], vv[:, t:t + L], gg[:, t:t + L], bb[:, t:t + L],
                                    state)
        outs.append(o)
        ends.append(state.view(B, HV, dv, dk))
    return torch.cat(outs, 1).view(B, HV, T, dv).transpose(1, 2), torch.stack(ends, 1)


@pytest.mark.parametrize(("T", "L", "reset_every"), [(45, 7, 0), (45, 16, 0), (48, 8, 16), (33, 64, 0)])
def test_chunk_parallel_core_matches_the_closed_form_values_and_gradients(T, L, reset_every):
    """delta_rule_chunks (all state-free work batched over chunks) against the serving closed form
    chunk by chunk, at odd sizes (a padded last chunk, GVA, an initial state), fp64: outputs, every
    chunk's end state, and the gradients of all inputs."""
    gen = torch.Generator().manual_seed(T + L)
    B, H, HV, dk, dv = 2, 2, 4, 8, 6
    f64 = dict(dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=gen, **f64), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=gen, **f64), dim=-1).requires_grad_()
    v = torch.randn(B, T, HV, dv, generator=gen, **f64).requires_grad_()
    g = (-torch.rand(B, T, HV, generator=gen, **f64)).requires_grad_()
    beta = torch.rand(B, T, HV, generator=gen, **f64).requires_grad_()
    s0 = (torch.randn(B, HV, dv, dk, generator=gen, **f64) * 0.3).requires_grad_()
    xs = [q, k, v, g, beta, s0]
    w_o = torch.randn(B, T, HV, dv, generator=gen, **f64)
    w_s = torch.randn(B, -(-T // L), HV, dv, dk, generator=gen, **f64)

    def run(fn):
        o, ends = fn(q, k, v, g, beta, dk**-0.5, s0, L, reset_every)
        grads = torch.autograd.grad((o * w_o).sum() + (ends * w_s).sum(), xs)
        return o.detach(), ends.detach(), grads

    o, ends, grads = run(delta_rule_chunks)
    o_ref, ends_ref, grads_ref = run(_closed_form_by_chunk)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(ends, ends_ref) < 1e-10
    for name, a, b in zip("q k v g beta s0".split(), grads, grads_ref, strict=True):
        assert rel_err(a, b) < 1e-9, name
