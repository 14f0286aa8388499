"""Which `ModelRunner` serves, decided once at start-up."""

from __future__ import annotations

import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.runner.base import ModelRunner
from mcserve.server.engine.runner.torch_runner import TorchModelRunner
from mcserve.server.engine.structured.masks import TokenMasks
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM


def make_runner(model: MCGatedDeltaNetForCausalLM, config: EngineConfig, *, ckpt_dtype: torch.dtype | None = None,
                seed: int | None = None, vocab_size: int | None = None, masks: TokenMasks | None = None
                ) -> ModelRunner:
    """The runner for `model`'s device with pools sized by `config`. One implementation so far: the
    torch runner (CPU and GPU)."""
    return TorchModelRunner(model, config.num_state_slots, config.num_checkpoint_blocks, config.num_host_blocks,
                            ckpt_dtype, seed=seed, vocab_size=vocab_size, masks=masks)
