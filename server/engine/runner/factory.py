"""Which `ModelRunner` serves, decided once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.runner.base import ModelRunner
from mcserve.server.engine.runner.torch_runner import TorchModelRunner
from mcserve.server.errors import ConfigError
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

if TYPE_CHECKING:  # masks.py imports llguidance, which may be missing (structured/grammars.py)
    from mcserve.server.engine.structured.masks import TokenMasks
    from mcserve.server.engine.tp.launcher import TPWorkers

RUNNERS = ("auto", "torch", "cuda")
DECODE_MATMULS = ("auto", "cublas")


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """How plans are executed (never what they compute).

    kind: "auto" = the CUDA runner on a CUDA device, the torch runner on CPU; "torch" = the torch
        runner anywhere (the reference); "cuda" = the CUDA runner's code anywhere (on CPU it runs the
        torch decode path without graphs: how its host logic is tested).
    enforce_eager: no CUDA graphs (every decode step launched op by op).
    cuda_graph_sizes: the batch sizes to capture graphs for (None: 1, 2, 4, 8, 16, 32, ..., max_num_seqs).
    async_scheduling: the engine launches a decode-only step before it processes the previous step's
        outputs (server/engine/pipeline.py). None (the default) = where steps really overlap: a runner
        that `overlaps` (the CUDA runner) on a CUDA device, serial otherwise; True = with any runner that
        overlaps, CPU included (how the pipeline is tested there), ignored with a warning otherwise;
        False = serial (`use_async_scheduling`).
    decode_matmul: the CUDA runner's decode matmuls on the Triton path. "auto" = per matmul and batch
        bucket the faster of cuBLAS and kernels/triton_mm.py as measured on this card (the committed
        kernels/configs/matmul_<card>.json; cuBLAS where there is none); "cublas" = always cuBLAS.
    """

    kind: str = "auto"
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    async_scheduling: bool | None = None
    decode_matmul: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ConfigError(f"runner must be one of {list(RUNNERS)}, got {self.kind!r}")
        sizes = self.cuda_graph_sizes
        if sizes is not None and (not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                   for s in sizes)):
            raise ConfigError(f"cuda_graph_sizes must be positive integers, got {sizes!r}")
        if self.decode_matmul not in DECODE_MATMULS:
            raise ConfigError(f"decode_matmul must be one of {list(DECODE_MATMULS)}, got {self.decode_matmul!r}")
        if not (self.async_scheduling is None or isinstance(self.async_scheduling, bool)):
            raise ConfigError(f"async_scheduling must be None (auto), True or False, got {self.async_scheduling!r}")


def use_async_scheduling(options: RunnerOptions | None, runner: ModelRunner, device: torch.device) -> bool:
    """Whether an engine on `device` with `runner` pipelines its steps (`RunnerOptions.async_scheduling`).
    Auto needs a CUDA device: on CPU the CUDA runner's `launch` computes the whole step before it
    returns, so there is nothing to overlap and the pipeline would only hand each step's deltas out
    one call later. An explicit True that the runner cannot follow is the caller's to warn about."""
    requested = (options or RunnerOptions()).async_scheduling
    if requested is None:
        return runner.overlaps and device.type == "cuda"
    return requested and runner.overlaps


def make_runner(model: MCGatedDeltaNetForCausalLM, config: EngineConfig, *, ckpt_dtype: torch.dtype | None = None,
                seed: int | None = None, vocab_size: int | None = None, masks: TokenMasks | None = None,
                options: RunnerOptions | None = None, tensor_parallel: TPWorkers | None = None) -> ModelRunner:
    """The runner for `model`'s device with pools sized by `config`; with `tensor_parallel` (rank 0
    of a group whose workers have allocated the same pools) the tensor-parallel runner, whatever
    `options` say (it runs the torch runner's stages on every rank: no CUDA graphs yet)."""
    if tensor_parallel is not None:
        from mcserve.server.engine.tp.runner import TPModelRunner
        from mcserve.server.model.sharding import ShardedMCGatedDeltaNet

        assert isinstance(model, ShardedMCGatedDeltaNet), type(model)
        return TPModelRunner(model, tensor_parallel, seed=seed, vocab_size=vocab_size, masks=masks)
    options = options or RunnerOptions()
    kind = options.kind
    if kind == "auto":
        kind = "cuda" if model.device.type == "cuda" else "torch"
    if kind == "torch":
        return TorchModelRunner(model, config.num_state_slots, config.num_checkpoint_blocks, config.num_host_blocks,
                                ckpt_dtype, seed=seed, vocab_size=vocab_size, masks=masks)
    from mcserve.server.engine.runner.cuda_runner import CudaModelRunner

    sizes = list(options.cuda_graph_sizes) if options.cuda_graph_sizes is not None else None
    return CudaModelRunner(model, config, ckpt_dtype, seed=seed, vocab_size=vocab_size, masks=masks,
                           enforce_eager=options.enforce_eager, cuda_graph_sizes=sizes,
                           decode_matmul=options.decode_matmul)
