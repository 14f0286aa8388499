"""The decode benchmarks run end to end on CPU (their GPU runs must work the first time): the GPU
table's script as its dry run (tiny preset, the CUDA runner's code with the torch decode path) and
the host-overhead benchmark at small sizes; both write what they measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


def test_decode_engine_dry_run(tmp_path: Path) -> None:
    _run("decode_engine.py", "--device", "cpu", "--batches", "1,3", "--steps", "3", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "decode_engine.json").read_text())
    rows = summary["rows"]
    assert [(r["batch"], r["aggregation"]) for r in rows] == [(1, "none"), (3, "none"), (1, "ssc k=4"),
                                                              (3, "ssc k=4")]
    assert all(r["ms_per_step"] > 0 and r["eager_steps"] > 0 for r in rows)
    # each row's engine is gone before the next is built (what ran B=512 out of memory after B=256)
    assert not [r["runner_held_by"] for r in rows if "runner_held_by" in r]
    assert "| 3 | ssc k=4 |" in (tmp_path / "decode_engine.md").read_text()
    kernels = (tmp_path / "decode_engine_kernels.txt").read_text()
    assert [line.split(":")[0] for line in kernels.splitlines() if line.startswith("== ")] == \
        ["== B=1 none", "== B=3 none", "== B=1 ssc k=4", "== B=3 ssc k=4"]
    assert "aten::mm" in kernels  # the profiler's table, by self CPU time on CPU


def test_host_overhead_small(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    text = _run("host_overhead.py", "--batches", "4", "--ckpts", "2,5", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["ckpts_per_row"]) for r in rows] == [(4, 2), (4, 5)]
    assert all(0 < r["sched_runner_ms"] <= r["engine_step_ms"] * 1.5 for r in rows), rows
    assert "| 4 | 5 |" in text


def test_host_overhead_full_pool(tmp_path: Path) -> None:
    """--full-pool: every boundary evicts an idle checkpoint (the script asserts it) after a pull of
    the router weights; the rows come out as in the default run."""
    out = tmp_path / "host.json"
    text = _run("host_overhead.py", "--batches", "4", "--ckpts", "3", "--full-pool", "--out", str(out))
    summary = json.loads(out.read_text())
    assert summary["full_pool"] and [(r["batch"], r["ckpts_per_row"]) for r in summary["rows"]] == [(4, 3)]
    assert "full pool" in text


def test_decode_equivalence_dry_run(tmp_path: Path) -> None:
    """tests/gpu/decode_equivalence.py on CPU (the CUDA runner's code with the torch decode path): its
    rows, the pinned fp32 flags and the extra rows of the shipped model are all there."""
    out = tmp_path / "eq.json"
    _run(str(BENCH.parent / "tests" / "gpu" / "decode_equivalence.py"), "--device", "cpu", "--quick", "--out", str(out))
    summary = json.loads(out.read_text())
    assert summary["passed"] and summary["logprobs_within_limit"] and not summary["skipped"]
    strict = summary["flags_strict"]
    assert strict["cuda.matmul.allow_tf32"] is False and strict["cudnn.allow_tf32"] is False
    assert sorted(summary["results"]) == sorted(
        ["default / cuda-graphs", "default / cuda-eager", "default / cuda-graphs-async",
         "default / torch again vs torch",
         "default / torch tf32 vs torch strict", "default / cuda-graphs tf32 vs torch tf32",
         "small-ssc / cuda-graphs", "small-ssc / cuda-eager", "small-ssc / cuda-graphs-async"])
    assert all(r["identical"] == "2/2" for r in summary["results"].values())
    # each runner row ran the scheduling its name says (async is the default only on a GPU)
    assert {k: r["async"] for k, r in summary["results"].items() if "async" in r} == {
        k: k.endswith("-async") for k, r in summary["results"].items() if "graphs" in r}
