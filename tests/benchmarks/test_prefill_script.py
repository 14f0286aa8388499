"""benchmarks/prefill.py runs end to end on CPU (tiny preset; its GPU run must work the first time),
writes every section it measured, and names the sections its time budget skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str) -> None:
    out = subprocess.run([sys.executable, "prefill.py", "--tiny", *args], cwd=BENCH, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])


def test_tiny_run_writes_every_section(tmp_path: Path) -> None:
    _run("--out", str(tmp_path), "--repeats", "1")
    d = json.loads((tmp_path / "prefill.json").read_text())
    assert [r["B"] for r in d["rows"]] == [1, 4]
    assert all(r["none tok/s"] > 0 and r["ssc k=4 tok/s"] > 0 for r in d["rows"])
    assert [r["path"] for r in d["long"]] == ["none", "ssc k=4"]
    assert len(d["chat_ttft_ms"]["reuse"]) == len(d["chat_ttft_ms"]["no-reuse"]) == 4
    assert d["alongside_decode"]["one_pass_s"] > 0 and not d["skipped"]
    assert "| 4 |" in (tmp_path / "prefill.md").read_text()


def test_budget_skips_and_says_so(tmp_path: Path) -> None:
    _run("--out", str(tmp_path), "--repeats", "1", "--budget-s", "0")
    d = json.loads((tmp_path / "prefill.json").read_text())
    assert "none B=1" in d["skipped"] and "chat TTFT" in d["skipped"]
    assert not d["long"] and "none tok/s" not in d["rows"][0]
    assert "skipped (time budget)" in (tmp_path / "prefill.md").read_text()
