"""kernels/triton_gemv.py against the torch ops it folds together (Triton's interpreter on CPU): the
matmul alone, with RMSNorm first, with the residual add, with SwiGLU over gate|up rows; 1 to 4 rows,
odd K and N, strided input rows, fp32 and bf16."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
gemv_mod = pytest.importorskip("mcserve.kernels.triton_gemv")

from mcserve.server.model.layers import RMSNorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("mode", ["plain", "norm", "residual", "swiglu"])
def test_gemv_equals_torch(dtype: torch.dtype, M: int, mode: str) -> None:
    K, N = 600, 37  # K above one 512-wide chunk, neither a power of two
    wide = _rand(M, K + 9, seed=1, dtype=dtype)
    x = wide[:, 4:4 + K]  # strided rows
    w = _rand(2 * N + 3 if mode == "swiglu" else N, K, seed=2, dtype=dtype) * 0.05
    norm = RMSNorm(K, 1e-6).to(DEV)
    norm.weight.data = _rand(K, seed=3) * 0.3 + 1
    r = _rand(M, N, seed=4, dtype=dtype)
    if mode == "plain":
        want, got = F.linear(x, w), gemv_mod.gemv(x, w)
    elif mode == "norm":
        want, got = F.linear(norm(x), w), gemv_mod.gemv(x, w, norm=(norm.weight, norm.eps))
    elif mode == "residual":
        want, got = r + F.linear(x, w), gemv_mod.gemv(x, w, residual=r)
    else:
        gu = F.linear(x, w)
        want = (F.silu(gu[:, :N].float()) * gu[:, N:2 * N].float()).to(dtype)
        got = gemv_mod.gemv(x, w, swiglu=N)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a summation order apart, one rounding
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
