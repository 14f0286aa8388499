"""torch.profiler over repeated calls of some GPU work: the fraction of the wall time in which some
kernel runs, the GPU operations (kernels, copies, memsets) per call, and the top-kernel table
(key_averages by self CUDA time). Without CUDA only the CPU side is recorded (busy None, the table by
self CPU time): what the benchmarks' CPU dry runs exercise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Profile:
    busy: float | None  # union of the kernels' [start, end) intervals / wall time of the calls
    gpu_ops_per_call: float
    table: str  # "== label" then key_averages' table


def busy_fraction(spans: list[tuple[float, float]], wall_us: float) -> float | None:
    """Union of the intervals (microseconds) / wall_us; None when there is none."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / wall_us if spans and wall_us > 0 else None


def profile_calls(fn: Callable[[], object], calls: int, label: str, rows: int = 25) -> Profile:
    """Runs fn `calls` times under the profiler (synchronising before and after on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows)
    return Profile(busy_fraction(kernels, wall * 1e6), len(kernels) / max(1, calls),
                   f"== {label}: {calls} calls, {wall / max(1, calls) * 1e3:.3f} ms per call, "
                   f"{len(kernels) / max(1, calls):.0f} GPU ops (kernels, copies, memsets) per call\n{table}")
