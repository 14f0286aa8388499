"""What a user may set when starting an engine, and how memory budgets become pool sizes.

Memory (`state_memory`, `checkpoint_memory`, `host_checkpoint_memory`): an int is bytes, a float in
(0, 1] a fraction of the device's total memory (host RAM for the host pool and on CPU).

- `checkpoint_memory` given: `state_memory` (default: exactly 2 * max_num_seqs slots) is for the
  online-state slots only.
- `checkpoint_memory` not given, `state_memory` given: `state_memory` covers both (this is what
  `mcserve serve --state-memory` means): the slots take what 2 * max_num_seqs need (at least
  max_num_seqs), the checkpoint pool the rest.
- neither: 2 * max_num_seqs slots; checkpoints get half the free GPU memory after the model is loaded
  on CUDA, `DEFAULT_CPU_CHECKPOINT_MEMORY` on CPU.
Slots beyond max_num_seqs hold end-of-turn snapshots. Too small a budget is a ConfigError at start-up
naming the numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mcserve.kernels.mc_spec import mc_problem
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.errors import ConfigError, count_in_budget
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.config import ModelConfig

DEFAULT_CPU_CHECKPOINT_MEMORY = 256 * 2**20
DEFAULT_GPU_CHECKPOINT_FRACTION_OF_FREE = 0.5
# Aggregations whose readout selects among the checkpoints present, so a dropped or offloaded one
# only narrows the choice; the others read every checkpoint and a hole would change the output.
HOLE_TOLERANT = ("none", "ssc")

Memory = int | float | None


def _check_memory(name: str, value: Memory) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be bytes (int) or a fraction in (0, 1] (float), got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} as a fraction must be in (0, 1], got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """Start-up settings of an engine (the keyword arguments of `from_model_dir`).

    device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype: model weights ("auto": bf16 on CUDA, fp32 on CPU).
    ckpt_dtype: checkpoint pool ("auto": bf16 on CUDA, the state dtype (fp32) on CPU). Resuming from
        a bf16 checkpoint is approximate (the state is rounded); fp32 resumes exactly.
    max_num_batched_tokens: None = max(2048, max_num_seqs, segment size).
    mc_aggregation / mc_top_k: override the checkpoint's memory-caching block.
    threads: intra-op CPU threads of the thread that runs the model; None = the process's CPU
        allowance less one core for the HTTP side (server/engine/cpu_threads.py).
    enforce_eager: no CUDA graphs for the decode step; cuda_graph_sizes: the batch sizes to capture
        (None: 1, 2, 4, 8, 16, then multiples of 16 up to max_num_seqs). runner: "auto" (the CUDA
        runner on CUDA, the torch runner on CPU), "torch" or "cuda" (runner/factory.py). decode_matmul:
        "auto" (the card's measured cuBLAS / Triton choice per matmul) or "cublas" (runner/factory.py).
    async_scheduling: launch each steady decode step before the previous one's outputs are
        processed (server/engine/pipeline.py). None (default): on with the CUDA runner on a CUDA
        device, serial otherwise; True: on with the CUDA runner (on CPU too), ignored with a warning
        with another runner; False: serial.
    tensor_parallel_size: processes (one per device) the model is sharded over by head
        (docs/PARALLELISM.md); memory budgets are then per device. tensor_parallel_timeout_s: the
        longest a collective may wait for a rank before the engine is declared dead.
    """

    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    ckpt_dtype: str | torch.dtype = "auto"
    max_num_seqs: int = 64
    max_model_len: int = 8192
    max_num_batched_tokens: int | None = None
    max_waiting: int = 1024
    state_memory: Memory = None
    checkpoint_memory: Memory = None
    host_checkpoint_memory: Memory = None
    mc_aggregation: str | None = None
    mc_top_k: int | None = None
    enable_prefix_caching: bool = True
    enable_snapshots: bool = True
    utility_decay: float = 0.99
    seed: int | None = None
    served_model_name: str | None = None
    threads: int | None = None
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    runner: str = "auto"
    async_scheduling: bool | None = None
    decode_matmul: str = "auto"
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_waiting"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        mbt = self.max_num_batched_tokens
        if mbt is not None and (isinstance(mbt, bool) or not isinstance(mbt, int) or mbt < 1):
            raise ConfigError(f"max_num_batched_tokens must be a positive integer, got {mbt!r}")
        for name in ("state_memory", "checkpoint_memory", "host_checkpoint_memory"):
            _check_memory(name, getattr(self, name))
        for name, value in self.mc_overrides().items():
            problem = mc_problem(name, value)
            if problem is not None:
                raise ConfigError(f"mc_{name} {problem}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        self.runner_options()  # ConfigError on a bad runner, size list
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        t = self.tensor_parallel_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"tensor_parallel_timeout_s must be a positive number, got {t!r}")
        if self.served_model_name is not None and not str(self.served_model_name).strip():
            raise ConfigError(f"served_model_name must not be blank, got {self.served_model_name!r}")

    def runner_options(self) -> RunnerOptions:
        sizes = self.cuda_graph_sizes
        return RunnerOptions(self.runner, self.enforce_eager, tuple(sizes) if sizes is not None else None,
                             async_scheduling=self.async_scheduling, decode_matmul=self.decode_matmul)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"device {self.device!r} is not a torch device: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but CUDA is not available")
        return dev

    def resolve_ckpt_dtype(self, device: torch.device, state_dtype: torch.dtype) -> torch.dtype:
        from mcserve.server.model.loader import resolve_dtype

        if self.ckpt_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else state_dtype
        try:
            return resolve_dtype(self.ckpt_dtype, device)
        except ValueError as e:
            raise ConfigError(f"ckpt_dtype: {e}") from None

    def mc_overrides(self) -> dict:
        return {k: v for k, v in (("aggregation", self.mc_aggregation), ("top_k", self.mc_top_k)) if v is not None}


@dataclass(frozen=True, slots=True)
class PoolSizes:
    num_state_slots: int
    num_checkpoint_blocks: int
    num_host_blocks: int
    bytes_per_slot: int
    bytes_per_block: int

    def describe(self) -> str:
        mib = 2**20
        return (f"{self.num_state_slots} state slots ({self.num_state_slots * self.bytes_per_slot / mib:.1f} MiB), "
                f"{self.num_checkpoint_blocks} checkpoint blocks "
                f"({self.num_checkpoint_blocks * self.bytes_per_block / mib:.1f} MiB), "
                f"{self.num_host_blocks} host blocks ({self.num_host_blocks * self.bytes_per_block / mib:.1f} MiB)")


def total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _bytes(value: Memory, total: int) -> int | None:
    if value is None:
        return None
    return int(value * total) if isinstance(value, float) else value


def size_pools(args: EngineArgs, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               ckpt_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> PoolSizes:
    """Slots and blocks from the budgets (see the module docstring); ConfigError when too small."""
    bps = StateSlots.bytes_per_slot(cfg, dtype) + _key_extra(cfg, state_dtype)
    bpb = CheckpointBlocks.bytes_per_block(cfg, ckpt_dtype, dtype)
    n = args.max_num_seqs
    hole_tolerant = cfg.mc.aggregation in HOLE_TOLERANT  # cfg: after the overrides
    seg = cfg.mc.segment_size
    min_blocks = max(2, n) if hole_tolerant else max(2, n, -(-args.max_model_len // seg))
    total = total_memory(device)
    state_b, ckpt_b = _bytes(args.state_memory, total), _bytes(args.checkpoint_memory, total)
    if ckpt_b is None and state_b is not None:
        need = n * bps + min_blocks * bpb
        if state_b < need:
            raise ConfigError(
                f"--state-memory of {state_b} bytes ({state_b / 2**30:.3f} GiB) cannot hold max_num_seqs={n} state"
                f" slots of {bps} bytes plus {min_blocks} checkpoint blocks of {bpb} bytes ({need} bytes): raise"
                f" it or lower --max-num-seqs")
        slots = min(2 * n, (state_b - min_blocks * bpb) // bps)
        blocks = (state_b - slots * bps) // bpb
    else:
        slots = (2 * n if state_b is None else
                 count_in_budget("--state-memory", state_b, "state slots", bps, n, f" (max_num_seqs={n})",
                                 " or lower --max-num-seqs"))
        if ckpt_b is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                ckpt_b = int((free - slots * bps) * DEFAULT_GPU_CHECKPOINT_FRACTION_OF_FREE)
            else:
                ckpt_b = DEFAULT_CPU_CHECKPOINT_MEMORY
        blocks = count_in_budget("checkpoint memory budget", ckpt_b, "blocks", bpb, min_blocks)
    host_b = _bytes(args.host_checkpoint_memory, total_memory(torch.device("cpu")))
    host = 0 if host_b is None else host_b // bpb
    return PoolSizes(slots, blocks, host, bps, bpb)


def _key_extra(cfg: ModelConfig, state_dtype: torch.dtype) -> int:
    """state_bytes() counts fp32; an fp64 model (tests) keeps states twice as wide."""
    return cfg.state_bytes() * (state_dtype.itemsize // 4 - 1)


def engine_config(args: EngineArgs, cfg: ModelConfig, pools: PoolSizes) -> EngineConfig:
    seg = cfg.mc.segment_size
    mbt = args.max_num_batched_tokens or max(2048, args.max_num_seqs, seg)
    return EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=mbt, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, segment_size=seg, num_state_slots=pools.num_state_slots,
        num_checkpoint_blocks=pools.num_checkpoint_blocks, num_host_blocks=pools.num_host_blocks,
        utility_decay=args.utility_decay, enable_prefix_caching=args.enable_prefix_caching,
        enable_snapshots=args.enable_snapshots, evict_running_checkpoints=cfg.mc.aggregation in HOLE_TOLERANT,
        reads_checkpoints=cfg.mc.aggregation != "none")
