"""The tensor-parallel process group: one process per device, NCCL between GPUs, gloo on CPU.

Collectives of the model's data (the two all-reduces per layer, the router-weight reduce per step)
go through `TPGroup`; the plan itself travels over pipes (launcher.py), so a worker idles on its
pipe, not in a collective, and the collective timeout only bounds work in progress.

NVLink multicast stays off in every process: `keep_multicast_off()` runs in the server process
before it starts a worker (which inherits the environment) and in every worker before it touches
CUDA. A program that uses multicast can put a shared host's GPUs out of service for a day; nothing
here calls a multicast API (no symmetric memory, no NVLS algorithms).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from mcserve.server.errors import ConfigError

log = logging.getLogger(__name__)

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# How long rank 0's store waits for every rank to join (start-up: the workers have loaded by then).
JOIN_TIMEOUT_S = 300.0


def keep_multicast_off() -> None:
    """Set MULTICAST_OFF in this process's environment (children inherit it). Forced: no setting of
    the user's may turn multicast on."""
    os.environ.update(MULTICAST_OFF)


def free_port() -> int:
    """A free TCP port on the loopback interface for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(base: torch.device, rank: int, world: int) -> torch.device:
    """Rank r runs on cuda:(base + r), or on the CPU. ConfigError when there are too few GPUs."""
    if base.type == "cpu":
        return base
    if base.type != "cuda":
        raise ConfigError(f"tensor parallelism runs on cpu or cuda devices, got {base}")
    first = base.index or 0
    have = torch.cuda.device_count()
    if first + world > have:
        raise ConfigError(f"tensor_parallel_size={world} from {base} needs GPUs {first}..{first + world - 1}, but "
                          f"{have} are visible")
    return torch.device("cuda", first + rank)


class TPGroup:
    """This process's membership of the group: rank, world size, device, and the collectives."""

    def __init__(self, rank: int, world: int, device: torch.device, port: int, timeout_s: float) -> None:
        keep_multicast_off()
        if dist.is_initialized():
            raise ConfigError("a tensor-parallel group already exists in this process (one engine per process)")
        self.rank, self.world, self.device = rank, world, device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                              timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        # `timeout` bounds every collective: a rank that stops answering fails the others' step
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        self._store = store
        log.info("tensor-parallel rank %d/%d on %s (%s)", rank, world, device, self.backend)

    def all_reduce(self, t: torch.Tensor) -> None:
        """In-place sum over the ranks."""
        dist.all_reduce(t)

    def reduce_to_first(self, t: torch.Tensor) -> None:
        """Sum over the ranks, into rank 0's `t` (the others' are left undefined)."""
        dist.reduce(t, dst=0)

    def abort(self) -> None:
        """Unblock collectives waiting on a rank that is gone (NCCL); the group is unusable after."""
        if self.backend == "nccl" and dist.is_initialized():
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            except Exception:  # logged: the collective then fails at its timeout instead
                log.exception("aborting the NCCL group failed")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
