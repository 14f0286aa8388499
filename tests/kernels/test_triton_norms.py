"""The fused Triton norms and SwiGLU against the model's torch modules (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
norms = pytest.importorskip("mcserve.kernels.triton_norms")

from mcserve.server.model.layers import GatedRMSNorm, RMSNorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("D", [37, 64])
def test_rmsnorm(D: int) -> None:
    norm = RMSNorm(D, 1e-6).to(DEV)
    norm.weight.data = _rand(D, seed=1)
    x = _rand(9, 3, D, seed=2) * 3
    assert torch.allclose(norms.rmsnorm(x, norm.weight, norm.eps), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_gated_rmsnorm(activation: str) -> None:
    D = 24
    norm = GatedRMSNorm(D, 1e-5, activation).to(DEV)
    norm.weight.data = _rand(D, seed=3)
    x, gate = _rand(11, 2, D, seed=4), _rand(11, 2, D, seed=5)
    got = norms.gated_rmsnorm(x, gate, norm.weight, norm.eps, activation)
    assert torch.allclose(got, norm(x, gate), atol=1e-5, rtol=1e-5)


def test_gated_rmsnorm_reads_a_strided_gate() -> None:
    """The gate as columns of a fused projection [T, P] viewed as [T, heads, D]: read in place."""
    D, heads = 12, 3
    norm = GatedRMSNorm(D, 1e-5, "swish").to(DEV)
    norm.weight.data = _rand(D, seed=8)
    proj = _rand(7, 50, seed=9)
    gate = proj[:, 5:5 + heads * D].view(7, heads, D)
    x = _rand(7, heads, D, seed=10)
    got = norms.gated_rmsnorm(x, gate, norm.weight, norm.eps, "swish")
    assert torch.allclose(got, norm(x, gate.contiguous()), atol=1e-5, rtol=1e-5)


def test_swiglu() -> None:
    gate, up = _rand(7, 1500, seed=6), _rand(7, 1500, seed=7)
    assert torch.allclose(norms.swiglu(gate, up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
