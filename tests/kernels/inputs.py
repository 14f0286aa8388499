"""Random core inputs for one layer, as the model would hand them to a kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


def core_inputs(T: int, H: int, HV: int, dk: int, dv: int, seed: int, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    q = F.normalize(rnd(T, H, dk), dim=-1)
    k = F.normalize(rnd(T, H, dk), dim=-1)
    v = rnd(T, HV, dv)
    decay = -torch.rand(T, HV, generator=g, dtype=F64) * 0.7
    beta = torch.rand(T, HV, generator=g, dtype=F64)
    u = rnd(T, H, dk)
    return tuple(x.to(dtype) for x in (q, k, v, decay, beta, u))


def zero_state(H: int, HV: int, dk: int, dv: int, dtype: torch.dtype = F64):
    return torch.zeros(HV, dv, dk, dtype=dtype), torch.zeros(H, dk, dtype=dtype)
