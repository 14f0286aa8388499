"""A tensor-parallel worker process (ranks 1..N-1): load the shard, join, then run every step rank 0
sends until told to stop (launcher.py has the protocol).

The worker has no scheduler, tokenizer or sampler: it executes plans on its shard, takes part in
the collectives, and reports nothing back per step. It idles on its pipe (no timeout: the server
may be idle for days); a closed pipe means rank 0 is gone and the worker exits.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from mcserve.server.engine.cpu_threads import use_threads
from mcserve.server.engine.tp.executor import ShardExecutor
from mcserve.server.engine.tp.group import MULTICAST_OFF, TPGroup, keep_multicast_off, rank_device
from mcserve.server.engine.tp.launcher import WorkerSpec
from mcserve.server.engine.tp.step_message import STOP, StepMessage, decode
from mcserve.server.model.shard_loader import load_shard
from mcserve.server.model.sharding import Shard

log = logging.getLogger(__name__)


def worker_main(rank: int, spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of worker `rank` (spawned by TPWorkers)."""
    keep_multicast_off()
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    group: TPGroup | None = None
    code = 0
    try:
        log.debug("started")
        use_threads(spec.threads)
        device = rank_device(torch.device(spec.base_device), rank, spec.world)
        if device.type == "cuda":  # before anything touches CUDA: no context on another rank's GPU
            torch.cuda.set_device(device)
        holder: list[TPGroup] = []
        model = load_shard(spec.model_dir, Shard(rank, spec.world), lambda t: holder[0].all_reduce(t), spec.dtype,
                           device, **spec.mc_overrides)
        log.debug("loaded its shard")
        conn.send(("loaded", {k: os.environ.get(k) for k in MULTICAST_OFF}))
        port = _expect(conn, "join")
        if port is None:
            return
        group = TPGroup(rank, spec.world, device, port, spec.timeout_s)
        holder.append(group)
        setup = _expect(conn, "setup")
        if setup is None:
            return
        executor = ShardExecutor(model, group, setup)
        conn.send(("ready", None))
        steps = 0
        while True:
            msg = decode(conn.recv_bytes())
            if msg == STOP:
                break
            assert isinstance(msg, StepMessage), type(msg)
            executor.forward(msg)
            steps += 1
        log.info("stopping after %d steps", steps)
    except EOFError:
        log.warning("rank 0 closed the pipe; exiting")
    except BaseException:  # noqa: B036 -- reported to rank 0, then the process exits non-zero
        code = 1
        text = traceback.format_exc()
        log.error("tensor-parallel rank %d failed:\n%s", rank, text)
        try:
            conn.send(("error", text.strip().splitlines()[-1]))
        except OSError:
            pass
    finally:
        if group is not None and code == 0:
            group.close()
        conn.close()
        sys.exit(code)


def _expect(conn: Connection, kind: str) -> Any:
    """The payload of rank 0's next start-up message, which must be `kind`; None when rank 0 says
    STOP instead (it gave up starting: another rank failed)."""
    msg = conn.recv()
    if msg == STOP:
        log.info("told to stop while starting")
        return None
    got, payload = msg
    assert got == kind, (got, kind)
    return payload
