"""benchmarks/prefill_scaling.py runs end to end on CPU (its GPU run must work the first time) and
writes one row per aggregation and cached count, each chunk run with the path the device selects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_tiny_run_writes_every_row(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "prefill_scaling.py", "--preset", "tiny", "--segment", "16", "--tokens",
                          "15", "--cached", "2,9", "--repeats", "1", "--out", str(tmp_path)], cwd=BENCH,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    d = json.loads((tmp_path / "prefill_scaling.json").read_text())
    assert [(r["aggregation"], r["cached"]) for r in d["rows"]] == [
        (a, n) for a in ("none", "ssc", "grm", "residual") for n in (2, 9)]
    assert all(r["ms"] > 0 and r["path"] == "torch" for r in d["rows"])
    assert "| ssc |" in out.stdout
