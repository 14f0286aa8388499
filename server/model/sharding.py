"""Tensor parallelism of the model: which slice of each weight a rank holds, and the sharded LM.

Sharded by head (docs/PARALLELISM.md). With N ranks, rank r holds q/k heads [r H/N, (r+1) H/N) and
the v-heads those heads feed, [r HV/N, (r+1) HV/N) (v-head j belongs to q/k head j // G, HV = G H),
so each rank has whole groups and its cores, router and readouts need nothing from another rank:

- column-parallel (rows of `[out, in]` split): q, k, u, v, g, a, b projections, MLP gate and up;
- channels split with them: the q/k/v short convolutions; per v-head: A_log, dt_bias;
- row-parallel (columns split, partial sums all-reduced): o_proj and MLP down, the two all-reduces
  of a layer;
- replicated: embeddings, RMSNorm weights (o_norm's weight is `[dv]`, shared by every head), the
  final norm; `lm_head` lives on rank 0 only (sampling happens there).

Every split is into N equal contiguous parts of one dim, because heads sit contiguously in head
order in fla's layout. A rank's model is the plain LM built on `shard_config` (H/N heads, HV/N
v-heads, M/N MLP width), so every path and pool of the model is the rank's slice of the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from mcserve.server.errors import ConfigError
from mcserve.server.model.config import ModelConfig
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

# name suffix -> the dim split into N parts (all others replicated)
SPLIT_DIM: dict[str, int] = {
    **{f"attn.{p}_proj.weight": 0 for p in ("q", "k", "u", "v", "g", "a", "b")},
    "attn.A_log": 0,
    "attn.dt_bias": 0,
    **{f"attn.{c}_conv1d.{w}": 0 for c in ("q", "k", "v") for w in ("weight", "bias")},
    "attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
}
HEAD_ONLY = ("lm_head.weight",)  # held by rank 0 alone

AllReduce = Callable[[torch.Tensor], None]  # in-place sum over the ranks


@dataclass(frozen=True, slots=True)
class Shard:
    """This process is rank `rank` of `world` tensor-parallel ranks."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world, (self.rank, self.world)

    @property
    def has_head(self) -> bool:
        return self.rank == 0


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """ConfigError naming the numbers when `cfg` cannot be split over `world` ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    H, HV, M = cfg.num_heads, cfg.num_v_heads_, cfg.mlp_size
    if H % world or HV % world:
        raise ConfigError(f"tensor_parallel_size={world} must divide num_heads={H} and num_v_heads={HV} (each rank "
                          f"holds whole q/k heads and the v-heads they feed); use a divisor of {H}")
    if M % world:
        raise ConfigError(f"tensor_parallel_size={world} must divide the MLP width {M} (intermediate_size)")


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """One rank's model: H/N q/k heads, HV/N v-heads, M/N MLP width; all else as in `cfg`."""
    check_divisible(cfg, world)
    return replace(cfg, num_heads=cfg.num_heads // world, num_v_heads=cfg.num_v_heads_ // world,
                   intermediate_size=cfg.mlp_size // world)


def split_dim(name: str) -> int | None:
    """The dim of tensor `name` that is split over ranks; None when it is replicated."""
    return next((d for suffix, d in SPLIT_DIM.items() if name.endswith(suffix)), None)


def shard_range(name: str, shape: tuple[int, ...] | torch.Size, shard: Shard) -> tuple[int, int, int] | None:
    """(dim, start, stop) of rank `shard.rank`'s part of the full tensor `name` of `shape`; None when
    the rank holds it whole."""
    dim = split_dim(name)
    if dim is None:
        return None
    size = shape[dim]
    assert size % shard.world == 0, (name, shape, shard)
    part = size // shard.world
    return dim, shard.rank * part, (shard.rank + 1) * part


def take_shard(name: str, full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rank `shard.rank`'s part of the full tensor `name`."""
    r = shard_range(name, full.shape, shard)
    return full if r is None else full.narrow(r[0], r[1], r[2] - r[1])


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split over the ranks: each computes a partial sum
    `x_r W_r^T`, then one all-reduce makes the full output on every rank. Same parameter name and
    shape convention as nn.Linear (`weight` [out, in / N])."""

    def __init__(self, in_features: int, out_features: int, all_reduce: AllReduce | None) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        assert self.all_reduce is not None, "a row-parallel layer ran without a process group"
        self.all_reduce(y)
        return y


class ShardedMCGatedDeltaNet(MCGatedDeltaNetForCausalLM):
    """One rank's part of the LM. `cfg` is the rank's (`shard_config`), `full_cfg` the checkpoint's.
    Ranks other than 0 hold no lm_head and return empty logits `[R, 0]` (rank 0 samples)."""

    def __init__(self, full_cfg: ModelConfig, shard: Shard, all_reduce: AllReduce | None) -> None:
        super().__init__(shard_config(full_cfg, shard.world))
        self.full_cfg = full_cfg
        self.shard = shard
        cfg = self.cfg
        for block in self.model.layers:
            block.attn.o_proj = RowParallelLinear(cfg.value_dim, cfg.hidden_size, all_reduce)
            block.mlp.down_proj = RowParallelLinear(cfg.mlp_size, cfg.hidden_size, all_reduce)
        if not shard.has_head:
            self.lm_head = None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shard.has_head:
            return x.new_empty((x.shape[0], 0), dtype=torch.float32)
        return super()._logits(x)
