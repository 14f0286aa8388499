"""The CPU allowance from affinity and cgroup quotas (v2 and v1 trees built in tmp dirs), and the
thread count the engine thread runs with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.cpu_threads import cgroup_cpu_limit, cpu_allowance, default_threads
from tests.server.engine.helpers import GREEDY, make_engine, random_prompts


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_v2_takes_the_tightest_quota_on_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "fs"
    _tree(root, {"cpu.max": "max 100000\n", "kubepods/cpu.max": "800000 100000\n",
                 "kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(proc, root) == 2.5
    _tree(root, {"kubepods/pod1/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(proc, root) == 8.0
    _tree(root, {"kubepods/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(proc, root) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "fs"
    _tree(root, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                 "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
                 "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(proc, root) == 1.5
    _tree(root, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n"})
    assert cgroup_cpu_limit(proc, root) is None
    assert cgroup_cpu_limit(tmp_path / "absent", root) is None


def test_allowance_is_affinity_capped_by_the_quota_rounded_down() -> None:
    assert cpu_allowance(set(range(16)), 4.0) == 4
    assert cpu_allowance(set(range(16)), 2.5) == 2  # a team wider than the quota is throttled
    assert cpu_allowance({3}, 8.0) == 1
    assert cpu_allowance(set(range(6)), 0.5) == 1
    assert cpu_allowance(set(range(6)), None, read_cgroup=False) == 6
    assert [default_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 2, 15]


@pytest.mark.parametrize("threads", [1, 3])
def test_the_engine_thread_runs_with_its_thread_count(model, tokenizer, threads: int) -> None:
    inner = make_engine(model, tokenizer)
    inner.num_threads = threads
    seen: list[int] = []
    execute = inner.runner.execute

    def recording(plan, sampling):
        seen.append(torch.get_num_threads())
        return execute(plan, sampling)

    inner.runner.execute = recording
    engine = AsyncEngine(inner)
    try:
        (p,) = random_prompts(5, [10])

        async def main() -> None:
            async for _ in engine.generate(GenerateRequest("t", tuple(p), GREEDY)):
                pass

        asyncio.run(main())
    finally:
        engine.shutdown()
    assert seen and set(seen) == {threads}
