"""Chunked prefill and batched decode against the token-by-token reference, at odd shapes."""

from __future__ import annotations

import pytest
import torch

from mcserve.kernels.decode.torch import decode_mc_gdn
from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.torch import chunked_mc_gdn
from mcserve.kernels.reference import reference_mc_gdn
from tests.kernels.inputs import F64, core_inputs, zero_state

AGGS = ["none", "residual", "grm", "soup", "ssc"]


def reference(spec, x, H, HV, dk, dv):
    state, key_sum = zero_state(H, HV, dk, dv)
    ckpts, keys = [], []
    y = reference_mc_gdn(*x, spec, 0, state, key_sum, ckpts, keys)
    return y, state, ckpts, keys


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("C,chunk", [(1, 64), (3, 2), (7, 64), (13, 5), (100, 8)])
@pytest.mark.parametrize("init", ["continue", "reset"])
def test_chunked_matches_reference(agg: str, C: int, chunk: int, init: str) -> None:
    H, HV, dk, dv, T = 3, 6, 11, 5, 37
    spec = MCSpec(agg, C, top_k=2, state_init=init)
    x = core_inputs(T, H, HV, dk, dv, seed=C * 7 + chunk)
    y_ref, s_ref, ck_ref, keys_ref = reference(spec, x, H, HV, dk, dv)
    state, key_sum = zero_state(H, HV, dk, dv)
    ckpts = torch.zeros(0, HV, dv, dk, dtype=F64)
    keys = torch.zeros(0, H, dk, dtype=F64)
    ys = []
    for a, b in [(0, 20), (20, 21), (21, T)]:  # resume mid-segment, on and off boundaries
        y, state, key_sum, new, _ = chunked_mc_gdn(*(t[a:b] for t in x), spec, a, state, key_sum, ckpts, keys,
                                                   chunk_size=chunk)
        ys.append(y)
        for c, k in new:
            ckpts, keys = torch.cat([ckpts, c[None]]), torch.cat([keys, k[None]])
    assert torch.allclose(torch.cat(ys), y_ref, atol=1e-11, rtol=1e-9)
    assert torch.allclose(state, s_ref, atol=1e-11)
    assert len(ck_ref) == ckpts.shape[0]
    if ck_ref:
        assert torch.allclose(ckpts, torch.stack(ck_ref), atol=1e-11)
        assert torch.allclose(keys, torch.stack(keys_ref), atol=1e-12)


def test_chunked_fp32_close_to_fp64_reference() -> None:
    H, HV, dk, dv, T = 2, 2, 64, 64, 200
    spec = MCSpec("ssc", 50, top_k=2)
    x = core_inputs(T, H, HV, dk, dv, seed=9)
    y_ref, *_ = reference(spec, x, H, HV, dk, dv)
    state, key_sum = zero_state(H, HV, dk, dv, torch.float32)
    y, *_ = chunked_mc_gdn(*(t.float() for t in x), spec, 0, state, key_sum,
                           torch.zeros(0, HV, dv, dk), torch.zeros(0, H, dk))
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < 1e-5


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("init", ["continue", "reset"])
def test_decode_over_pools_matches_reference(agg: str, init: str) -> None:
    """Sequences at different positions in one batch; pools poisoned with NaN; a dropped block."""
    H, HV, dk, dv, C = 2, 4, 6, 5, 3
    spec = MCSpec(agg, C, top_k=2, state_init=init)
    lens, prefill = [23, 9, 31], [10, 3, 17]
    xs = [core_inputs(T, H, HV, dk, dv, seed=40 + i) for i, T in enumerate(lens)]
    refs = [reference(spec, x, H, HV, dk, dv)[0] for x in xs]
    n_slots, n_blocks = 6, 40
    pools = [torch.full(s, float("nan"), dtype=F64) for s in
             [(n_slots, HV, dv, dk), (n_slots, H, dk), (n_blocks, HV, dv, dk), (n_blocks, H, dk)]]
    slots, tables, outs, next_block = [5, 0, 3], [[], [], []], [[], [], []], iter(range(n_blocks))
    for b, x in enumerate(xs):
        state, key_sum = zero_state(H, HV, dk, dv)
        y, state, key_sum, new, _ = chunked_mc_gdn(*(t[: prefill[b]] for t in x), spec, 0, state, key_sum,
                                                   torch.zeros(0, HV, dv, dk, dtype=F64), torch.zeros(0, H, dk,
                                                                                                      dtype=F64))
        outs[b].append(y)
        pools[0][slots[b]], pools[1][slots[b]] = state, key_sum
        for c, k in new:
            blk = next(next_block)
            pools[2][blk], pools[3][blk] = c, k
            tables[b].append(blk)
    pos = list(prefill)
    while any(p < T for p, T in zip(pos, lens, strict=True)):
        rows = [b for b in range(3) if pos[b] < lens[b]]
        width = max(len(tables[b]) for b in rows) + 2  # extra -1 padding columns
        table = torch.tensor([tables[b] + [-1] * (width - len(tables[b])) for b in rows])
        writes = torch.tensor([next(next_block) if pos[b] % C == C - 1 else -1 for b in rows])
        args = [torch.stack([xs[b][i][pos[b]] for b in rows]) for i in range(6)]
        y, w = decode_mc_gdn(*args, spec, torch.tensor([pos[b] for b in rows]), torch.tensor([slots[b] for b in rows]),
                             *pools, table, writes)
        assert torch.isfinite(y).all()
        if spec.reads_cache and w is not None:
            assert w.shape == table.shape and torch.all(w[table < 0] == 0)
        for r, b in enumerate(rows):
            outs[b].append(y[r : r + 1])
            pos[b] += 1
            if writes[r] >= 0:
                tables[b].append(int(writes[r]))
    for b in range(3):
        assert torch.allclose(torch.cat(outs[b]), refs[b], atol=1e-11, rtol=1e-9)


def test_decode_dropped_checkpoint_is_never_read() -> None:
    """A hole (-1) in the table: SSC picks among the rest; the result equals a table without it."""
    H, HV, dk, dv, C = 2, 2, 5, 4, 2
    spec = MCSpec("ssc", C, top_k=1)
    x = core_inputs(1, H, HV, dk, dv, seed=11)
    pools = [torch.randn(3, HV, dv, dk, dtype=F64), torch.randn(3, H, dk, dtype=F64),
             torch.randn(6, HV, dv, dk, dtype=F64), torch.randn(6, H, dk, dtype=F64)]
    pools[2][4] = float("nan")  # the dropped block's storage may hold anything
    pos = torch.tensor([6])  # segment 3: three cached memories
    outs = []
    for table in ([[1, 4, 2]], [[1, -1, 2]]):
        p = [t.clone() for t in pools]
        p[3][4] = 1e3 * x[5][0]  # block 4 would win the top-1 if it were readable
        y, _ = decode_mc_gdn(*x, spec, pos, torch.tensor([0]), *p, torch.tensor(table), torch.tensor([-1]))
        outs.append(y)
    assert torch.isnan(outs[0]).any()  # readable: SSC selected block 4 and read its garbage
    assert torch.isfinite(outs[1]).all()


def test_decode_per_row_top_k() -> None:
    H, HV, dk, dv, C = 1, 1, 4, 3, 1
    x = core_inputs(2, H, HV, dk, dv, seed=12)
    pools = [torch.randn(2, HV, dv, dk, dtype=F64), torch.zeros(2, H, dk, dtype=F64),
             torch.randn(5, HV, dv, dk, dtype=F64), torch.randn(5, H, dk, dtype=F64)]
    table = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    pos = torch.tensor([4, 4])
    y, w = decode_mc_gdn(*x, MCSpec("ssc", C, top_k=4), pos, torch.tensor([0, 1]), *pools, table,
                         torch.tensor([-1, -1]), top_k=torch.tensor([1, 3]))
    assert int((w[0] > 0).sum()) == 1 and int((w[1] > 0).sum()) == 3
