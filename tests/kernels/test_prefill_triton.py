"""The Triton prefill readout against the packed torch readout (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
triton_mod = pytest.importorskip("mcserve.kernels.prefill.triton")

from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from mcserve.kernels.prefill.batched import segment_keys  # noqa: E402
from mcserve.kernels.prefill.packed import core_rounds, readout_rounds  # noqa: E402
from tests.kernels.prefill_cases import make_case  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def prepared(spec, spans, dtype=torch.float32, ckpt_dtype=None, **kw):
    """A case whose pools hold this step's checkpoints and keys (the core and keys ran in torch)."""
    case = make_case(spec, spans, dtype=torch.float64, **kw)
    q, k, v, g, beta, u = case.x
    pools = case.pools
    key_sum0 = segment_keys(k, case.batch, pools[1], pools[3])
    o = core_rounds(q, k, v, g, beta, case.batch, spec, pools[0], pools[2])
    cast = [o, q, u, k, key_sum0]
    return case, [t.to(dtype) for t in cast], pools[2].to(ckpt_dtype or dtype), pools[3].to(dtype)


def both(case, ins, ckpt, keys, **kw):
    n, W = case.batch.num_chunks, case.batch.table_width
    w_ref = torch.zeros(n, W, dtype=ins[0].dtype)
    ref = readout_rounds(*ins, case.batch, case.spec, ckpt, keys, w_ref)
    w = torch.zeros(n, W, dtype=torch.float32)
    got = triton_mod.readout_triton(*ins, case.batch, case.spec, ckpt, keys, w, **kw)
    return ref, w_ref, got, w


@pytest.mark.parametrize("agg", ["residual", "grm", "ssc"])
def test_readout_matches_torch(agg: str) -> None:
    """Chunks on, before and after boundaries, several pieces and tiles per chunk, a hole, per-chunk k."""
    spec = MCSpec(agg, 6, top_k=2)
    case, ins, ckpt, keys = prepared(spec, [(0, 14), (9, 40), (13, 14), (24, 31)], holes=[set(), {0}, set(), {2}],
                                     top_k=[2, 1, 3, 2], H=2, HV=4, dk=20, dv=9, seed=7)
    ref, w_ref, got, w = both(case, ins, ckpt, keys, block_t=16)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), float((got - ref).abs().max())
    assert torch.allclose(w, w_ref, atol=1e-4), (w, w_ref)
    assert torch.all(w[1, 0] == 0) and torch.all(w[3, 2] == 0)


def test_long_segments_span_several_tiles() -> None:
    """C = 40 with 16-row tiles: the online score's key sum runs over earlier tiles of the piece and, for a
    chunk that starts inside a segment, from the slot's running sum."""
    spec = MCSpec("ssc", 40, top_k=1)
    case, ins, ckpt, keys = prepared(spec, [(0, 82), (30, 61)], seed=11, dk=8, dv=4, H=1, HV=1)
    ref, w_ref, got, w = both(case, ins, ckpt, keys, block_t=16)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), float((got - ref).abs().max())
    assert torch.allclose(w, w_ref, atol=1e-4)


def test_ties_go_to_the_lower_index() -> None:
    """Equal segment keys give equal scores: SSC must take the lowest indices, as the torch path does."""
    spec = MCSpec("ssc", 4, top_k=2)
    case, ins, ckpt, keys = prepared(spec, [(16, 23)], seed=8)
    keys[case.batch.table[0, :4]] = keys[case.batch.table[0, 0]].clone()  # four memories, one key
    ref, w_ref, got, w = both(case, ins, ckpt, keys)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert (w[0, :2] > 0).all() and (w[0, 2:4] == 0).all()


def test_bf16_checkpoints() -> None:
    spec = MCSpec("ssc", 5, top_k=2)
    case, ins, ckpt, keys = prepared(spec, [(0, 23), (7, 12)], ckpt_dtype=torch.bfloat16, seed=9, dk=16, dv=16)
    # bf16 pool addressing and loads; the bf16 tensor-core dot itself only runs on a GPU (the interpreter
    # cannot multiply bf16), where tests/gpu/prefill_check.py covers it
    ref, _, got, _ = both(case, ins, ckpt, keys, dot_fp32=not torch.cuda.is_available())
    assert float((got - ref).norm() / ref.norm()) < (1e-5 if not torch.cuda.is_available() else 1e-2)


def test_poisoned_outputs_and_pool_entries_are_not_read() -> None:
    """Outputs start as NaN (torch.empty may hold anything) and every pool entry outside the tables is NaN
    (make_case poisons them): every row of y must still be finite and equal the torch readout."""
    spec = MCSpec("grm", 4, top_k=2)
    case, ins, ckpt, keys = prepared(spec, [(5, 21), (0, 3)], holes=[{0}], seed=10)
    hole_block = [b for b in range(ckpt.shape[0]) if b not in case.batch.table.flatten().tolist()][0]
    assert torch.isnan(ckpt[hole_block]).all()
    real_empty = torch.empty
    torch.empty = lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))  # poison the kernel's outputs
    try:
        ref, _, got, _ = both(case, ins, ckpt, keys)
    finally:
        torch.empty = real_empty
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("W,bias", [(4, False), (2, True)])
def test_short_conv_matches_torch(W: int, bias: bool) -> None:
    from mcserve.kernels.prefill.packed import short_conv_rows
    from mcserve.kernels.prefill.triton_conv import short_conv_triton

    g = torch.Generator().manual_seed(W)
    D, rows = 37, 50
    ext = torch.randn(rows, D, generator=g).to(DEV)
    tok_rows = torch.tensor([r for r in range(W - 1, rows) if r % 9 != 0]).to(DEV)  # some rows are state rows
    weight = torch.randn(D, W, generator=g).to(DEV)
    b = torch.randn(D, generator=g).to(DEV) if bias else None
    want = short_conv_rows(ext, tok_rows, weight, b)
    got = short_conv_triton(ext, tok_rows, weight, b)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
