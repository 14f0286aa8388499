"""The packed torch prefill (many chunks at once) against the per-sequence path and the reference."""

from __future__ import annotations

import pytest
import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill import packed
from mcserve.kernels.prefill.batched import batched_mc_gdn
from mcserve.kernels.reference import reference_mc_gdn
from tests.kernels.inputs import zero_state
from tests.kernels.prefill_cases import make_case, oracle

AGGS = ["none", "residual", "grm", "soup", "ssc"]
# C = 5: chunks that start on (0, 10), before (9) and after (11, 3) a boundary and end on (10, 15), before
# (24) and after (21, 4) one; a one-token chunk; a chunk over several boundaries
SPANS = [(0, 10), (9, 21), (11, 24), (3, 4), (10, 15), (20, 33)]


def run(case, chunk_size: int = 64, **kw):
    pools = [t.clone() for t in case.pools]
    w = torch.zeros(case.batch.num_chunks, case.batch.table_width, dtype=pools[0].dtype)
    y = batched_mc_gdn(*case.x, case.spec, case.batch, *pools, weights=w, **kw)
    return y, pools, w


def check(case, got, exp, atol=1e-11):
    y, pools, w = got
    assert torch.allclose(y, exp.y, atol=atol, rtol=1e-9), float((y - exp.y).abs().max())
    for ch, s, ks, made in zip(case.batch.chunks, exp.states, exp.key_sums, exp.ckpts, strict=True):
        assert torch.allclose(pools[0][ch.slot], s, atol=atol)
        assert torch.allclose(pools[1][ch.slot], ks, atol=atol)
        assert len(made) == len(ch.write_blocks)
        for b, (c, key) in zip(ch.write_blocks, made, strict=True):
            assert torch.allclose(pools[2][b].to(c.dtype), c.to(pools[2].dtype).to(c.dtype), atol=atol)
            assert torch.allclose(pools[3][b], key, atol=atol)
    if case.spec.reads_cache:
        assert torch.allclose(w, exp.weights, atol=1e-9), (w, exp.weights)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("init", ["continue", "reset"])
def test_many_chunks_at_different_positions_equal_the_per_sequence_path(agg: str, init: str) -> None:
    case = make_case(MCSpec(agg, 5, top_k=2, state_init=init), SPANS, seed=1)
    check(case, run(case, chunk_size=3), oracle(case, chunk_size=3))


@pytest.mark.parametrize("agg", ["grm", "ssc", "residual"])
def test_holes_and_per_chunk_top_k(agg: str) -> None:
    spans = [(12, 30), (25, 26), (17, 40)]
    case = make_case(MCSpec(agg, 4, top_k=3), spans, seed=2, holes=[{0}, {1, 4}, set()], top_k=[1, 3, 2])
    exp = oracle(case)
    check(case, run(case), exp)
    assert torch.all(exp.weights[0, 0] == 0) and torch.all(exp.weights[1, [1, 4]] == 0)


@pytest.mark.parametrize("agg", AGGS)
def test_equals_the_float64_reference(agg: str) -> None:
    """Fresh sequences, whole prompts in one batch, against the token-by-token recurrence."""
    H, HV, dk, dv = 2, 4, 6, 5
    spec = MCSpec(agg, 4, top_k=2)
    case = make_case(spec, [(0, 13), (0, 8), (0, 3)], seed=3, H=H, HV=HV, dk=dk, dv=dv)
    y, pools, _ = run(case)
    for i in range(len(case.spans)):
        state, key_sum = zero_state(H, HV, dk, dv)
        ckpts, keys = [], []
        ref = reference_mc_gdn(*case.seq_x[i], spec, 0, state, key_sum, ckpts, keys)
        rows = slice(case.batch.cu[i], case.batch.cu[i + 1])
        assert torch.allclose(y[rows], ref, atol=1e-11, rtol=1e-9)
        assert torch.allclose(pools[0][case.batch.chunks[i].slot], state, atol=1e-11)
        for blk, c, key in zip(case.batch.chunks[i].write_blocks, ckpts, keys, strict=True):
            assert torch.allclose(pools[2][blk], c, atol=1e-11) and torch.allclose(pools[3][blk], key, atol=1e-12)


def test_bf16_checkpoints_are_read_as_written() -> None:
    case = make_case(MCSpec("ssc", 3, top_k=2), [(0, 11), (4, 19)], seed=4, dtype=torch.float32,
                     ckpt_dtype=torch.bfloat16)
    check(case, run(case), oracle(case), atol=1e-5)


def test_unread_pool_entries_stay_unread() -> None:
    """Blocks outside the tables and the holes hold NaN (make_case poisons every pool entry it does not
    write): no output, state or weight may be NaN."""
    case = make_case(MCSpec("grm", 4, top_k=2), [(9, 23), (4, 5)], seed=5, holes=[{1}, set()])
    case.pools[2][case.batch.chunks[0].read_blocks[0]] = float("nan")  # a read block: NaN must show
    y, pools, w = run(case)
    assert torch.isnan(y[: case.batch.cu[1]]).any()
    fine = make_case(MCSpec("grm", 4, top_k=2), [(9, 23), (4, 5)], seed=5, holes=[{1}, set()])
    y, pools, w = run(fine)
    assert torch.isfinite(y).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("per_token", [False, True])
def test_union_and_per_token_readouts_equal_the_per_sequence_path(per_token: bool, monkeypatch) -> None:
    """SSC's two readouts (kernels/prefill/packed.py: the union of a row's choices, or each token's own
    k), forced one way, with holes, per-chunk k and poisoned checkpoints that no token may read."""
    monkeypatch.setattr(packed, "reads_per_token", lambda rows, k_max, pairs: per_token)
    spans = [(12, 30), (25, 26), (17, 40), (0, 9), (33, 47)]
    case = make_case(MCSpec("ssc", 4, top_k=2), spans, seed=5, holes=[{0}, {1, 4}, set(), set(), {2, 3, 7}],
                     top_k=[1, 3, 2, 2, 4])
    used = set(case.batch.table.flatten().tolist()) | {b for c in case.batch.chunks for b in c.write_blocks}
    unused = [b for b in range(case.pools[2].shape[0]) if b not in used]
    assert unused
    case.pools[2][unused] = float("nan")
    exp = oracle(case)
    got = run(case, chunk_size=5)
    assert torch.isfinite(got[0]).all()
    check(case, got, exp)


def test_the_readout_is_picked_by_how_far_the_choices_spread(monkeypatch) -> None:
    """Unforced, a round whose choices stay within a few memories takes the union readout, and one whose
    tokens spread over many more memories than 24 x k takes the per-token one; both equal the oracle."""
    taken = []
    per_token = packed._mix_per_token
    monkeypatch.setattr(packed, "_mix_per_token", lambda *a: taken.append(1) or per_token(*a))
    few = make_case(MCSpec("ssc", 4, top_k=2), [(12, 30), (25, 26)], seed=6)
    check(few, run(few), oracle(few))
    assert not taken
    many = make_case(MCSpec("ssc", 16, top_k=1), [(1290, 1330)], seed=7, H=4, HV=8, n_blocks=100)
    check(many, run(many), oracle(many))
    assert taken
