"""Small versions of the reliability scripts (benchmarks/), each against its own real `mcserve serve`
on loopback: the full runs and their figures are in docs/RELIABILITY.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout_s: int = 600) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=timeout_s)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_concurrent_streams_complete_or_get_503_with_retry_after() -> None:
    out = _run("load_streams.py", "--clients", "40", "--max-tokens", "4", "--client", "both",
               "--server-args", "--max-num-seqs 4 --max-waiting 8")
    for client in ("httpx", "raw"):
        line = next(x for x in out.splitlines() if x.startswith(f"40 streaming clients ({client})"))
        assert "0 other" in line and "got 503 + Retry-After" in line, out


def test_client_cuts_leave_nothing_allocated() -> None:
    out = _run("client_cuts.py", "--cuts", "100", "--concurrency", "16")
    assert "state_slots{running}': 0.0" in out and "checkpoint_blocks{running}': 0.0" in out


def test_hostile_input_is_refused_fast_and_health_keeps_answering() -> None:
    # The 100 ms bar is the full run's (docs/RELIABILITY.md); CI shares its machine, so it allows 1 s.
    out = _run("hostile_input.py", "--refuse-within-s", "1.0")
    assert "FAIL" not in out


def test_schemathesis_finds_no_5xx_or_schema_violation(tmp_path: Path) -> None:
    # Its own report directory: two runs sharing one (concurrent suites on a box) overwrite each other's events.
    _run("fuzz_api.py", "--max-examples", "15", "--min-cases", "40", "--report-dir", str(tmp_path / "fuzz"))
