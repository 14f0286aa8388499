"""The per-head core inputs of a Gated DeltaNet layer from its projection outputs (the math of kernels/reference.py):
L2-normalised q and k, the log-decay g and the step size beta, and the router query u.

The one definition shared by the model (server/model/layers.py) and the torch decode path; the
Triton kernels compute the same in registers (kernels/decode/triton_router.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim (fla's use_qk_l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
              allow_neg_eigval: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [R, HV] projection outputs -> (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b),
    doubled with allow_neg_eigval), both [R, HV] in `dtype`."""
    g = -torch.exp(A_log.to(dtype)) * F.softplus(a.to(dtype) + dt_bias.to(dtype))
    beta = torch.sigmoid(b.to(dtype))
    if allow_neg_eigval:
        beta = beta * 2.0
    return g, beta


def core_inputs(q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                u_raw: torch.Tensor | None, A_log: torch.Tensor, dt_bias: torch.Tensor, allow_neg_eigval: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q_raw, k_raw [R, H, dk] (after the short conv), v [R, HV, dv], a, b [R, HV], u_raw [R, H, dk] or
    None -> (q, k, v, g, beta, u) in `dtype`: q, k L2-normalised (q not yet scaled by dk^-0.5); u is
    u_raw as is (learned router) or the normalised q (query router)."""
    q = l2norm(q_raw.to(dtype))
    k = l2norm(k_raw.to(dtype))
    g, beta = gdn_gates(a, b, A_log, dt_bias, allow_neg_eigval, dtype)
    u = q if u_raw is None else u_raw.to(dtype)
    return q, k, v.to(dtype), g, beta, u
