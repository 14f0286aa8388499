"""The fla core's layout work (padding, varlen pieces, checkpoints from per-chunk states, slots) against
the packed torch core, on CPU: fla's two entry points are replaced by an exact torch implementation of
their contract (per-sequence chunks of BT tokens, the state at each chunk's start). fla itself is run
against the torch path on a GPU by tests/gpu/prefill_check.py."""

from __future__ import annotations

import pytest
import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill import fla
from mcserve.kernels.prefill.packed import core_rounds
from mcserve.kernels.prefill.torch import delta_rule_chunk
from tests.kernels.prefill_cases import make_case


def _rows(x: torch.Tensor, G: int = 1) -> torch.Tensor:  # [L, H, d] -> [H * G, L, d]
    return x.repeat_interleave(G, dim=1).transpose(0, 1)


def chunk_with_states(q, k, v, g, beta, scale, h0, cu, cu_cpu, bt):
    G = v.shape[2] // q.shape[2]
    outs, hs, finals = [], [], []
    for n in range(len(cu_cpu) - 1):
        state = h0[n]
        for t in range(int(cu_cpu[n]), int(cu_cpu[n + 1]), bt):
            e = min(t + bt, int(cu_cpu[n + 1]))
            hs.append(state)
            o, state = delta_rule_chunk(_rows(q[0, t:e] * scale, G), _rows(k[0, t:e], G), _rows(v[0, t:e]),
                                        g[0, t:e].t(), beta[0, t:e].t(), state)
            outs.append(o.transpose(0, 1))
        finals.append(state)
    return torch.cat(outs)[None], torch.stack(hs)[None], torch.stack(finals)


def chunk_final(q, k, v, g, beta, scale, h0, cu, cu_cpu):
    o, _, final = chunk_with_states(q, k, v, g, beta, scale, h0, cu, cu_cpu, 64)
    return o, final


@pytest.fixture
def fake_fla(monkeypatch):
    monkeypatch.setattr(fla, "chunk_with_states", chunk_with_states)
    monkeypatch.setattr(fla, "chunk_final", chunk_final)


@pytest.mark.parametrize("init", ["continue", "reset"])
@pytest.mark.parametrize("C", [16, 32])
def test_core_matches_torch_rounds(fake_fla, init: str, C: int) -> None:
    """Chunks that start off the kernel's chunk grid (padding), on and between boundaries, a one-token chunk."""
    spec = MCSpec("ssc", C, state_init=init)
    case = make_case(spec, [(0, 2 * C + 5), (5, 3 * C), (C, C + 1), (C + 7, 3 * C + 9), (2 * C - 3, 2 * C)], seed=3)
    ref_pools = [t.clone() for t in case.pools]
    ref = core_rounds(*case.x[:5], case.batch, spec, ref_pools[0], ref_pools[2])
    got = fla.core_fla(*case.x[:5], case.batch, spec, case.pools[0], case.pools[2], dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-11)
    assert torch.allclose(case.pools[0], ref_pools[0], atol=1e-11, equal_nan=True)
    written = [b for c in case.batch.chunks for b in c.write_blocks]
    assert torch.allclose(case.pools[2][written], ref_pools[2][written], atol=1e-11)
    assert torch.isnan(case.pools[2][[b for b in range(case.pools[2].shape[0]) if b not in
                                      {x for c in case.batch.chunks for x in c.read_blocks + c.write_blocks}]]).all()


def test_chunk_size_and_support() -> None:
    assert fla.chunk_size(MCSpec(segment_size=256)) == 64
    assert fla.chunk_size(MCSpec(segment_size=48)) == 16
    assert fla.chunk_size(MCSpec(segment_size=96)) == 32


def test_missing_or_wrong_fla_is_a_clear_error(monkeypatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "fla", None)  # not installed
    with pytest.raises(fla.FlaUnavailable, match="not installed"):
        fla.check_supported(MCSpec())
    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(__version__="0.5.2"))
    with pytest.raises(fla.FlaUnavailable, match="0.5.2 found"):
        fla.check_supported(MCSpec())
