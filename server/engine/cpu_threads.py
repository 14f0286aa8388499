"""How many CPU threads the engine's intra-op pool gets, and setting them in the thread that runs
the model.

`cpu_allowance()` is what the process may really use: the CPUs of its affinity mask, capped by the
cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, the tightest along the
cgroup's path). `os.cpu_count()` is the host's core count, which a container or a `taskset` does
not change; torch's default follows it.

Why the engine takes one core less than the allowance (`default_threads`): every intra-op parallel
region ends in a barrier that waits for all its threads. When the team spans every allowed core,
any other runnable thread -- the HTTP event loop, the tokenizer worker, another process -- deschedules
one member and the whole team waits out a scheduler time slice: on the 2-core box that made the
tiny model's step 50-80x slower. One core is left for the HTTP side, and below 2 cores the engine
runs on one thread (no barrier at all). `docs/RELIABILITY.md` has the measurements.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by `cpu.max` ("max 100000" or "<quota> <period>"); None when unlimited/absent."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """root/a/b/c, root/a/b, root/a, root: the quota of any ancestor also caps the process. Inside a
    container the cgroup namespace usually makes `root` the container's own cgroup already."""
    parts = [p for p in cgroup_path.split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota (in CPUs, may be fractional) on the process's cgroup path, v2 or v1;
    None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: "0::/path"
            dirs = _ancestors(cgroup_root, path)
            limits += [q for d in dirs if (q := _quota_v2(d)) is not None]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in (cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += [q for d in _ancestors(mount, path) if (q := _quota_v1(d)) is not None]
                    break
    return min(limits) if limits else None


def cpu_allowance(
    affinity: set[int] | None = None, quota_cpus: float | None = None, *, read_cgroup: bool = True
) -> int:
    """CPUs this process can keep busy: the affinity mask, capped by the cgroup quota rounded down
    (a team wider than the quota is throttled mid-region), at least 1."""
    cpus = len(affinity if affinity is not None else os.sched_getaffinity(0))
    quota = quota_cpus if quota_cpus is not None or not read_cgroup else cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def default_threads(allowance: int) -> int:
    """The engine's intra-op threads: the allowance less one core for the HTTP side (see the module
    docstring), at least 1."""
    return max(1, allowance - 1)


def resolve_threads(threads: int | None) -> int:
    return threads if threads is not None else default_threads(cpu_allowance())


def use_threads(n: int) -> None:
    """Size the intra-op pool for the calling thread. torch (OpenMP) keeps the team size per thread,
    so the thread that runs the model must call this itself."""
    assert n >= 1, n
    torch.set_num_threads(n)


def set_interop_threads(n: int = 1) -> None:
    """The engine runs its ops one after another, so the inter-op pool has nothing to do; 1 keeps torch
    from starting a thread per core for it. Allowed only before any parallel work in the process."""
    torch.set_num_interop_threads(n)
