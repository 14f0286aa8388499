"""benchmarks/kernels_replay.py runs end to end on CPU under the Triton interpreter (its one GPU run must
work the first time): the replay step agrees with the existing step over W + 1 steps, and every cell
writes its row. The CUDA-graph columns need a GPU (they read '-' here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_replay_benchmark_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "kernels_replay.py", "--smoke", "--out", str(tmp_path)], cwd=BENCH,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    out = json.loads((tmp_path / "kernels_replay.json").read_text())
    (check,) = out["checks"]
    assert check["y"] < 1e-5 and check["state"] < 1e-5 and check["ckpt"] < 1e-2, check
    replay = [r for r in out["rows"] if r["path"] == "replay"]
    assert {(r["agg"], r["k"]) for r in replay} == {("none", 0), ("ssc", 2)}
    assert all(r["ms"] > 0 and r["graph_ms"] is None and r["bytes"] > 0 for r in replay)
    assert "best replay config" in done.stdout and (tmp_path / "kernels_replay.md").exists()
