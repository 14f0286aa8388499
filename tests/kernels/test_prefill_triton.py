"""The Triton prefill readout against the packed torch readout (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
triton_mod = pytest.importorskip("mcserve.kernels.prefill.triton")

from mcserve.kernels.gates import l2norm  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from mcserve.kernels.prefill.batched import segment_keys  # noqa: E402
from mcserve.kernels.prefill.packed import core_rounds, readout_rounds  # noqa: E402
from mcserve.kernels.prefill.varlen import VarlenBatch  # noqa: E402
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


def _conv_heads_ref(raw, prev, lengths, weight, bias, H, dk):
    """Per chunk: the causal conv over [its conv state, its tokens] + SiLU in fp32, rounded to raw's dtype,
    then q and k heads L2-normalised in fp32 (server/model/layers.py's ShortConv, kernels/gates.py)."""
    W = weight.shape[1]
    outs, start = [], 0
    for i, n in enumerate(lengths):
        xx = torch.cat([prev[i].t().to(raw.dtype), raw[start:start + n]]).float()  # [W-1+n, D]
        y = sum(xx[j:j + n] * weight[:, j].float() for j in range(W))
        if bias is not None:
            y = y + bias.float()
        outs.append(torch.nn.functional.silu(y).to(raw.dtype))
        start += n
    y = torch.cat(outs)
    kd = H * dk
    q, k = (l2norm(y[:, a:a + kd].float().view(-1, H, dk)) for a in (0, kd))
    return q, k, y[:, 2 * kd:]


@pytest.mark.parametrize("W,bias,dtype", [(4, False, torch.float32), (2, True, torch.float32),
                                          (4, True, torch.bfloat16)])
def test_conv_heads_matches_torch(W: int, bias: bool, dtype: torch.dtype) -> None:
    """Chunks shorter than the conv window (taps reach back into the state), a one-token chunk, rows of
    the input strided (columns of a wider projection), head widths that are not powers of two; token
    blocks (launch_config's BT) with no chunk start (no state loads) and with starts inside them."""
    from mcserve.kernels.prefill.triton_conv import conv_heads_triton, launch_config

    g = torch.Generator().manual_seed(W)
    H, dk, vd = 3, 12, 40
    D = 2 * H * dk + vd
    lengths = [5, 1, 2, 70, 3, 33]
    assert launch_config(dk)["BT"] < 70 - 2 * W  # a block of the long chunk reads no state
    T, n = sum(lengths), len(lengths)
    wide = torch.randn(T, D + 7, generator=g).to(dtype)
    raw = wide[:, 3:3 + D]  # row stride D + 7
    prev = torch.randn(n, D, W - 1, generator=g).to(dtype)
    weight = torch.randn(D, W, generator=g).to(dtype)
    b = torch.randn(D, generator=g).to(dtype) if bias else None
    seq = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
    off = torch.cat([torch.arange(m) for m in lengths])
    args = [t.to(DEV) for t in (raw, prev, seq.int(), off.int(), weight)]
    q, k, v, q32, k32 = conv_heads_triton(*args, None if b is None else b.to(DEV), H, dk, True)
    q_ref, k_ref, v_ref = _conv_heads_ref(raw, prev, lengths, weight, b, H, dk)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert q.dtype == k.dtype == v.dtype == dtype and q32.dtype == k32.dtype == torch.float32
    assert torch.allclose(v.cpu().float(), v_ref.float(), **tol)
    for got, got32, want in ((q, q32, q_ref), (k, k32, k_ref)):
        assert torch.allclose(got32.cpu(), want, **tol)
        assert torch.allclose(got.cpu().float(), want.to(dtype).float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_keys_match_torch(dtype: torch.dtype) -> None:
    """Pieces of a segment's full length, of one token, chunks starting mid-segment (the slot's running
    sum added), ending on a boundary (the slot's sum reset) and inside a segment; k rows strided; pools
    as layer views: the returned sums, the slots' sums and every segment key equal batched.py's."""
    from mcserve.kernels.prefill.triton_keys import segment_keys_triton

    spec = MCSpec("ssc", 7, top_k=2)
    case = make_case(spec, [(0, 15), (3, 4), (9, 30), (6, 7)], H=2, HV=2, dk=10, dv=3, seed=12)
    assert any(p.first and case.batch.chunks[p.seq].start_pos % 7 for p in case.batch.pieces)
    k = case.x[1].to(dtype)
    wide = torch.zeros(k.shape[0], 3, 10, dtype=dtype)
    wide[:, 1:] = k
    strided = wide[:, 1:]
    g = torch.Generator().manual_seed(5)
    slots0 = torch.randn(3, case.pools[1].shape[0], 2, 10, generator=g)  # [L, slots, H, dk]
    keys0 = torch.randn(case.pools[3].shape[0], 3, 2, 10, generator=g)  # [blocks, L, H, dk]
    slots_ref, keys_ref = slots0.clone(), keys0.clone()
    want = segment_keys(k.double(), case.batch, slots_ref[1], keys_ref[:, 1])
    slots_got, keys_got = slots0.clone().to(DEV), keys0.clone().to(DEV)
    got = segment_keys_triton(strided.to(DEV), VarlenBatch(case.batch.chunks, 7, DEV), slots_got[1],
                              keys_got[:, 1])
    assert torch.allclose(got.cpu(), want.float())
    assert torch.allclose(slots_got.cpu(), slots_ref, atol=1e-5) and torch.allclose(keys_got.cpu(), keys_ref, atol=1e-5)
    assert not torch.equal(keys_ref, keys0) and not torch.equal(slots_ref, slots0)


@pytest.mark.parametrize("holes", [False, True])
def test_grouped_readout_for_many_memories(holes: bool) -> None:
    """Chunks that see many more memories than k take the readout grouped by checkpoint: equal to the torch
    readout, with tokens choosing different sets, per-chunk k (one above what some tokens see), holes, a
    chunk starting mid-segment, boundaries inside chunks (checkpoints made in the same chunk read)."""
    from mcserve.kernels.prefill.triton_grouped import use_grouped

    spec = MCSpec("ssc", 3, top_k=2)
    case, ins, ckpt, keys = prepared(spec, [(0, 40), (22, 41), (30, 34)], top_k=[2, 1, 5], H=2, HV=4, dk=12, dv=7,
                                     seed=13, holes=[{1, 4}, {0}, set()] if holes else None)
    assert use_grouped(case.batch, "ssc")
    ref, w_ref, got, w = both(case, ins, ckpt, keys, block_t=16)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), float((got - ref).abs().max())
    assert torch.allclose(w, w_ref, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_equals_indexing(dtype: torch.dtype) -> None:
    """Into a layer's view of a [blocks, L, ...] pool (first-dim stride spans the layers) from chosen
    rows and from every row, cast to the pool's dtype; rows longer than one program's block, empty.
    Exact, except fp32 -> bf16 under the interpreter (it truncates; the GPU rounds to nearest as torch)."""
    from mcserve.kernels.prefill.triton_rows import BLOCK, copy_rows

    def same(a, b):
        exact = dtype == torch.float32 or DEV == "cuda"
        return torch.equal(a, b) if exact else torch.allclose(a.float(), b.float(), rtol=1e-2, atol=0)

    g = torch.Generator().manual_seed(3)
    pool = torch.randn(7, 3, 2, 3, BLOCK // 4 + 5, generator=g).to(dtype).to(DEV)  # [blocks, L, HV, dv, dk]
    want = pool.clone()
    src = torch.randn(5, 2, 3, BLOCK // 4 + 5, generator=g).to(DEV)  # fp32, as fla's states
    rows, picks = torch.tensor([6, 0, 3], device=DEV), torch.tensor([4, 4, 1], device=DEV)
    copy_rows(pool[:, 1], rows, src, picks)
    want[:, 1][rows] = src[picks].to(dtype)
    assert same(pool, want)
    every = torch.tensor([2, 5, 1, 0, 6], device=DEV)
    copy_rows(pool[:, 2], every, src)
    want[:, 2][every] = src.to(dtype)
    copy_rows(pool[:, 0], every[:0], src[:0])
    assert same(pool, want)
