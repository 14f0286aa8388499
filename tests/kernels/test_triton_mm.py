"""kernels/triton_mm.py: the decode step's matmul against an fp32 product (Triton's interpreter on
CPU), at odd shapes, strided rows, split-K into fp32; and the table's choice of Triton vs cuBLAS."""

from __future__ import annotations

import os

import pytest
import torch

from mcserve.kernels.triton_mm import MARGIN, MatmulTable, MMConfig, table_for

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="needs a GPU or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "N", "K", "cfg"), [
    (1, 40, 96, MMConfig(16, 32, 1, 4, 2)),
    (5, 72, 200, MMConfig(32, 64, 3, 4, 2)),   # K split in 3 ranges, the last one short
    (17, 33, 70, MMConfig(16, 32, 2, 4, 2)),   # N, K not multiples of the blocks
    (70, 130, 64, MMConfig(64, 32, 1, 4, 2)),  # M past one block: the grid's M dimension
])
def test_mm_matches_fp32_product(M: int, N: int, K: int, cfg: MMConfig, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(M * N + K)
    base = torch.randn(M, K + 9, generator=g).to(dtype)
    x = base[:, 3:3 + K]  # strided rows, as the step's column views are
    w = torch.randn(N, K, generator=g).to(dtype)
    want = x.double() @ w.double().T
    from mcserve.kernels.triton_mm import mm

    y = mm(x, w, cfg)
    if cfg.split > 1:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)
    else:
        assert y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
        torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    out = torch.full((M, N), float("nan"), dtype=y.dtype)
    if cfg.split > 1:  # accumulates into a given zeroed buffer
        out.zero_()
    assert mm(x, w, cfg, out=out) is out and torch.equal(out, y)


def _table(rows) -> MatmulTable:
    return MatmulTable({"device": "card", "rows": [
        {"N": N, "K": K, "M": M, "torch_ms": t, "configs": {k: {"ms": v} for k, v in cfgs.items()}}
        for N, K, M, t, cfgs in rows]})


def test_table_choice() -> None:
    s1, s4 = "bn64_bk128_s1_w4_st4", "bn32_bk128_s4_w4_st4"
    t = _table([(64, 32, 1, 1.0, {s1: 0.5, s4: 0.4}), (64, 32, 64, 1.0, {s1: 1 / MARGIN + 1e-6, s4: 0.99}),
                (64, 32, 16, 1.0, {s1: 0.9})])
    bf = torch.bfloat16
    assert t.choose(64, 32, 1, bf, allow_split=True) == MMConfig.parse(s4)
    assert t.choose(64, 32, 1, bf, allow_split=False) == MMConfig.parse(s1)
    assert t.choose(64, 32, 2, bf, allow_split=True) == MMConfig.parse(s1)  # M=16's entry: nearest above
    assert t.choose(64, 32, 17, bf, allow_split=False) is None  # M=64's best is within MARGIN of cuBLAS
    assert t.choose(64, 32, 65, bf, allow_split=True) is None  # past the largest measured batch
    assert t.choose(64, 33, 1, bf, allow_split=True) is None  # a shape it never measured
    assert t.choose(64, 32, 1, torch.float32, allow_split=True) is None  # measured in bf16
    with pytest.raises(ValueError):
        MMConfig.parse("bn64")


def test_committed_h200_table_reads() -> None:
    t = table_for("NVIDIA H200")
    assert t is not None and t.rows and table_for("no such card") is None
    for (N, K), rows in t.rows.items():
        for M, torch_ms, timed in rows:
            assert torch_ms > 0 and timed, (N, K, M)
            cfg = t.choose(N, K, M, torch.bfloat16, allow_split=True)
            assert cfg is None or torch_ms >= MARGIN * timed[cfg.name()]
