"""Starting and watching the tensor-parallel workers from the server process (rank 0).

`launch` starts ranks 1..N-1, each with a duplex pipe to rank 0, and loads rank 0's own shard
meanwhile. Workers are forked from multiprocessing's fork server, which has imported the worker's
modules (torch included) once and never touched CUDA or started a thread pool: a plain fork of the
server process could inherit its threads' locks and a CUDA context; spawn would re-import torch for
every launch (seconds). Start-up, over the pipes:

    worker: load its shard        -> ("loaded", its multicast variables)
    rank 0: all loaded            -> ("join", port); every rank joins the group on a free loopback port
    rank 0: pools sized (Setup)   -> worker allocates them -> ("ready", None)
    rank 0, each step             -> the encoded StepMessage (the same bytes to every worker)
    rank 0, at shutdown           -> STOP

A worker that fails sends ("error", its traceback) and exits; one whose pipe closes (rank 0 gone)
exits. A monitor thread on rank 0 watches the workers' processes: when one dies it records why and
aborts the group (NCCL), so that a step blocked in a collective fails instead of waiting for the
collective timeout; the runner turns that into EngineDeadError.

Every process started here inherits `MULTICAST_OFF` (group.py), and each worker reports the values
it sees: launching refuses to go on if multicast could be on in any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mcserve.server.engine.tp.group import MULTICAST_OFF, TPGroup, free_port, keep_multicast_off, rank_device
from mcserve.server.engine.tp.step_message import STOP, Setup, StepMessage, encode
from mcserve.server.errors import ConfigError
from mcserve.server.model.loader import load_config
from mcserve.server.model.shard_loader import load_shard
from mcserve.server.model.sharding import Shard, ShardedMCGatedDeltaNet, check_divisible

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # loading a shard (large models, slow disks) and joining
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to load its shard and join (picklable)."""

    model_dir: str
    world: int
    base_device: str
    dtype: str | torch.dtype
    mc_overrides: dict = field(default_factory=dict)
    threads: int = 1
    timeout_s: float = 600.0
    log_level: int = logging.INFO


class TPWorkers:
    """Rank 0's handle on ranks 1..N-1: their processes and pipes, and the group once joined."""

    def __init__(self, spec: WorkerSpec) -> None:
        from mcserve.server.engine.tp.worker import worker_main

        keep_multicast_off()  # before the spawn: the children inherit the environment
        self.spec = spec
        self.group: TPGroup | None = None
        self.setup: Setup | None = None
        self.worker_env: list[dict[str, str | None]] = []
        self._failure: str | None = None
        self._stopping = False
        ctx = mp.get_context("forkserver")
        # takes effect when the server first starts; torch._dynamo: building a model on the meta
        # device imports it (seconds), which every fork would otherwise repeat
        ctx.set_forkserver_preload([worker_main.__module__, "torch._dynamo"])
        self._procs, self._conns = [], []
        for rank in range(1, spec.world):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, args=(rank, spec, child), name=f"mcserve-tp{rank}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def all_reduce(self, t: torch.Tensor) -> None:
        """The model's all-reduce (bound before the group exists; used only after it does)."""
        assert self.group is not None, "collective before the group was joined"
        self.group.all_reduce(t)

    def join(self, device: torch.device) -> None:
        """Wait for every worker's shard, then join the group (rank 0 on `device`)."""
        for env in self._expect("loaded", START_TIMEOUT_S):
            if any(env.get(k) != v for k, v in MULTICAST_OFF.items()):
                raise ConfigError(f"a tensor-parallel worker sees {env}, not {MULTICAST_OFF}: refusing to run with"
                                  " NVLink multicast possibly on")
            self.worker_env.append(env)
        port = free_port()
        for c in self._conns:
            c.send(("join", port))
        self.group = TPGroup(0, self.spec.world, device, port, self.spec.timeout_s)

    def start_serving(self, setup: Setup) -> None:
        """Every worker allocates the pools of `setup`; then the monitor watches them."""
        self.setup = setup
        for c in self._conns:
            c.send(("setup", setup))
        self._expect("ready", START_TIMEOUT_S)
        threading.Thread(target=self._monitor, name="mcserve-tp-monitor", daemon=True).start()

    def send(self, msg: StepMessage) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        data = encode(msg)
        for c in self._conns:
            c.send_bytes(data)

    def describe_failure(self, error: BaseException) -> str:
        """What went wrong, preferring what the monitor saw (a worker's exit) to the symptom here."""
        time.sleep(0.2)  # a dying worker's exit usually lands just after the collective's error
        return self._failure or f"{error!r}"

    @property
    def failure(self) -> str | None:
        return self._failure

    def stop(self) -> None:
        """Ask the workers to leave, kill those that do not, leave the group (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        for c, p in zip(self._conns, self._procs, strict=True):
            if p.is_alive():
                try:
                    c.send_bytes(encode(STOP))
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(STOP_TIMEOUT_S)
        for c in self._conns:
            c.close()
        if self.group is not None:
            if self._failure is not None:
                self.group.abort()
            self.group.close()
            self.group = None

    def _expect(self, kind: str, timeout_s: float) -> list[Any]:
        """Each worker's next message, which must be `kind`; ConfigError naming the rank when one
        fails, exits or says nothing for `timeout_s`."""
        out: list[Any] = [None] * len(self._conns)
        pending = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(f"tensor-parallel ranks {[i + 1 for i in pending]} sent no '{kind}' in"
                                  f" {timeout_s:.0f} s")
            ready = wait([*pending.values(), *(self._procs[i].sentinel for i in pending)], timeout=left)
            for i in list(pending):
                conn, proc = pending[i], self._procs[i]
                if conn in ready:
                    try:
                        got, payload = conn.recv()
                    except EOFError:
                        proc.join(STOP_TIMEOUT_S)
                        got, payload = "error", f"exited with code {proc.exitcode}"
                elif proc.sentinel in ready:
                    proc.join(STOP_TIMEOUT_S)
                    got, payload = "error", f"exited with code {proc.exitcode}"
                else:
                    continue
                if got != kind:
                    raise ConfigError(f"tensor-parallel rank {i + 1} failed to start: {payload}")
                out[i] = payload
                del pending[i]
        return out

    def _monitor(self) -> None:
        """Record the first worker that reports an error or exits, and abort the group."""
        watch = {p.sentinel: i for i, p in enumerate(self._procs)} | {c: i for i, c in enumerate(self._conns)}
        while not self._stopping:
            ready = wait(list(watch), timeout=1.0)
            for obj in ready:
                i = watch[obj]
                if isinstance(obj, Connection):
                    try:
                        _, text = obj.recv()
                    except (EOFError, OSError):
                        text = "closed its pipe"
                    watch.pop(obj)
                    self._fail(f"tensor-parallel rank {i + 1} failed: {text}")
                else:
                    self._procs[i].join(1.0)
                    watch.pop(obj)
                    self._fail(f"tensor-parallel rank {i + 1} exited with code {self._procs[i].exitcode}")
            if self._failure is not None:
                return

    def _fail(self, why: str) -> None:
        if self._stopping or self._failure is not None:
            return
        self._failure = why
        log.error("%s; the engine is dead", why)
        if self.group is not None:
            self.group.abort()


def launch(model_dir: str | Path, world: int, device: torch.device, dtype: str | torch.dtype,
           mc_overrides: dict, threads: int, timeout_s: float) -> tuple[TPWorkers, ShardedMCGatedDeltaNet]:
    """Start ranks 1..world-1, load rank 0's shard here, join the group. ConfigError (before any
    process starts) when the model does not split over `world` ranks or there are too few GPUs."""
    check_divisible(load_config(model_dir, **mc_overrides), world)
    rank_device(device, world - 1, world)
    spec = WorkerSpec(str(model_dir), world, str(device), dtype, dict(mc_overrides), threads, timeout_s,
                      logging.getLogger().getEffectiveLevel())
    workers = TPWorkers(spec)
    try:
        rank0 = rank_device(device, 0, world)
        if rank0.type == "cuda":
            torch.cuda.set_device(rank0)
        model = load_shard(model_dir, Shard(0, world), workers.all_reduce, dtype, rank0, **mc_overrides)
        workers.join(rank0)
    except BaseException:
        workers.stop()
        raise
    return workers, model
