"""Tensor-parallel shards of a checkpoint (server/model/sharding.py, shard_loader.py), in one process:
every rank's weights are its slice of the full ones, the slices tile the tensor, pools shrink by N,
and head counts that do not split are a clear error. The forward across ranks is tested with real
processes in tests/server/engine/test_tensor_parallel.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mcserve.server.errors import ConfigError
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_config, load_model
from mcserve.server.model.shard_loader import load_shard
from mcserve.server.model.sharding import Shard, shard_config, split_dim


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 q/k heads, each feeding 2 v-heads (HV = 8), an MLP width of 96, a learned router."""
    d = tmp_path_factory.mktemp("grouped")
    init_model(d, preset="tiny", mc={"aggregation": "ssc", "top_k": 2, "segment_size": 8, "router": "learned"},
               seed=5, num_heads=4, num_v_heads=8, intermediate_size=96)
    return d


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_slices_tile_every_weight(grouped: Path, world: int) -> None:
    full = load_model(grouped, dtype="float32").state_dict()
    shards = [load_shard(grouped, Shard(r, world), None, "float32").state_dict() for r in range(world)]
    assert "lm_head.weight" in shards[0] and all("lm_head.weight" not in s for s in shards[1:])
    for name, tensor in full.items():
        dim = split_dim(name)
        parts = [s[name] for s in shards if name in s]
        if dim is None:
            assert all(torch.equal(p, tensor) for p in parts), name
        else:
            assert all(p.shape[dim] == tensor.shape[dim] // world for p in parts), name
            assert torch.equal(torch.cat(parts, dim), tensor), name
    split = {n for n in full if split_dim(n) is not None}
    assert {n.split(".")[-2] + "." + n.split(".")[-1] for n in split} >= {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "g_proj.weight",
        "u_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"}


def test_each_rank_holds_a_nth_of_every_sequence_memory(grouped: Path) -> None:
    cfg = load_config(grouped)
    part = shard_config(cfg, 4)
    assert (part.num_heads, part.num_v_heads_, part.mlp_size) == (1, 2, 24)
    assert StateSlots.bytes_per_slot(part, torch.bfloat16) * 4 == StateSlots.bytes_per_slot(cfg, torch.bfloat16)
    for ckpt in (torch.float32, torch.bfloat16):
        assert (CheckpointBlocks.bytes_per_block(part, ckpt, torch.bfloat16) * 4
                == CheckpointBlocks.bytes_per_block(cfg, ckpt, torch.bfloat16))


@pytest.mark.parametrize("world,match", [
    (3, "tensor_parallel_size=3 must divide num_heads=4 and num_v_heads=8"),
    (8, "tensor_parallel_size=8 must divide num_heads=4"),
])
def test_heads_that_do_not_split_are_a_config_error(grouped: Path, world: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_shard(grouped, Shard(0, world), None, "float32")


def test_an_mlp_that_does_not_split_is_a_config_error(tmp_path: Path) -> None:
    init_model(tmp_path, preset="tiny", seed=0, intermediate_size=97)
    with pytest.raises(ConfigError, match="must divide the MLP width 97"):
        shard_config(load_config(tmp_path), 2)
