"""The router weight the chunked prefill reports per checkpoint does not depend on how the sequence
is cut into calls: reads of a checkpoint made inside the call that wrote it count like reads of a
given one (they feed the cache's utility)."""

from __future__ import annotations

import pytest
import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.torch import chunked_mc_gdn
from tests.kernels.inputs import F64, core_inputs, zero_state


def _weights(spec: MCSpec, x, cuts: list[int], H: int, HV: int, dk: int, dv: int) -> torch.Tensor:
    """Total weight per checkpoint over calls covering [cuts[i], cuts[i+1])."""
    state, key_sum = zero_state(H, HV, dk, dv)
    ckpts, keys = torch.zeros(0, HV, dv, dk, dtype=F64), torch.zeros(0, H, dk, dtype=F64)
    total = torch.zeros(cuts[-1] // spec.segment_size, dtype=F64)
    for a, b in zip(cuts, cuts[1:], strict=False):
        _, state, key_sum, new, w = chunked_mc_gdn(*(t[a:b] for t in x), spec, a, state, key_sum, ckpts, keys,
                                                   chunk_size=5)
        assert w.shape == (ckpts.shape[0] + len(new),)
        total[:w.shape[0]] += w
        for c, k in new:
            ckpts, keys = torch.cat([ckpts, c[None]]), torch.cat([keys, k[None]])
    return total


@pytest.mark.parametrize("agg", ["residual", "grm", "soup", "ssc"])
def test_weights_count_reads_of_checkpoints_made_in_the_same_call(agg: str) -> None:
    H, HV, dk, dv, T, C = 3, 6, 11, 5, 37, 7
    spec = MCSpec(agg, C, top_k=2)
    x = core_inputs(T, H, HV, dk, dv, seed=3)
    whole = _weights(spec, x, [0, T], H, HV, dk, dv)
    per_segment = _weights(spec, x, [*range(0, T, C), T], H, HV, dk, dv)  # every read from a given one
    odd = _weights(spec, x, [0, 9, 10, 30, T], H, HV, dk, dv)
    assert (whole > 0).all()  # every checkpoint was read, the later ones also by the call that made them
    assert torch.allclose(whole, per_segment, rtol=1e-10) and torch.allclose(odd, per_segment, rtol=1e-10)


def test_aggregation_none_reports_zero_weights() -> None:
    H, HV, dk, dv, T, C = 2, 2, 4, 3, 20, 6
    x = core_inputs(T, H, HV, dk, dv, seed=4)
    state, key_sum = zero_state(H, HV, dk, dv)
    *_, w = chunked_mc_gdn(*x, MCSpec("none", C), 0, state, key_sum,
                           torch.zeros(0, HV, dv, dk, dtype=F64), torch.zeros(0, H, dk, dtype=F64))
    assert w.shape == (T // C,) and not w.any()
