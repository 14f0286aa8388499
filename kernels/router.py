"""Router weights of Memory Caching, shared by the chunked prefill and the batched decode paths.

Shapes use R for "rows" (tokens of one sequence in prefill, sequences in decode), N for cached
segments, H for q/k heads. The token-by-token reference (reference.py) does not use this file,
so the tests compare two independent implementations.
"""

from __future__ import annotations

import torch

from mcserve.kernels.mc_spec import MCSpec


def ssc_order(r_cached: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cached memories per (row, head) from the highest score down, ties to the lower index, missing
    ones last. [R, H, N] indices."""
    masked = r_cached.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.sort(masked, dim=-1, descending=True, stable=True).indices


def select_mask(
    r_cached: torch.Tensor,  # [R, H, N]
    valid: torch.Tensor,  # [R, N] bool: the checkpoint exists (not a hole, not beyond the segment)
    top_k: torch.Tensor | int,  # per row [R] or one int
    order: torch.Tensor | None = None,  # ssc_order(r_cached, valid), if the caller already has it
) -> torch.Tensor:
    """SSC's choice: the top_k highest scores per (row, head); ties go to the lower index. [R, H, N] bool."""
    R, H, N = r_cached.shape
    if order is None:
        order = ssc_order(r_cached, valid)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(N, device=order.device).expand(R, H, N))
    k = top_k if isinstance(top_k, int) else top_k.view(R, 1, 1)
    return (ranks < k) & valid[:, None, :]


def mc_gamma(
    r_online: torch.Tensor,  # [R, H]
    r_cached: torch.Tensor,  # [R, H, N]
    chosen: torch.Tensor,  # [R, H, N] bool: which cached memories take part
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over {online} and the chosen cached memories. Returns (gamma_online [R, H],
    gamma_cached [R, H, N], zero where not chosen)."""
    logits = torch.cat([r_online[..., None], r_cached.masked_fill(~chosen, float("-inf"))], dim=-1)
    gamma = torch.softmax(logits, dim=-1)
    return gamma[..., 0], gamma[..., 1:]


def chosen_mask(spec: MCSpec, r_cached: torch.Tensor, valid: torch.Tensor,
                top_k: torch.Tensor | int | None = None) -> torch.Tensor:
    """Which cached memories each (row, head) reads under `spec`. [R, H, N] bool."""
    if spec.aggregation == "ssc":
        return select_mask(r_cached, valid, spec.top_k if top_k is None else top_k)
    return valid[:, None, :].expand_as(r_cached)
