"""The decode-kernel scripts run end to end on CPU under the Triton interpreter (their one GPU run must
work the first time): the config sweep writes a table that the benchmark then runs, each row naming
the config it ran; and the sweep's candidate lists for the real shapes cover the config space the
table is chosen from. The CUDA-graph columns need a GPU (they read '-' here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from kernel_cells import SHAPES  # noqa: E402
from kernel_sweep import KINDS, candidates  # noqa: E402

from mcserve.kernels.decode.tuning import ConfigTable  # noqa: E402


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


def test_sweep_then_benchmark_with_its_table(tmp_path: Path) -> None:
    table_path = tmp_path / "sweep" / "interpreter.json"
    _run("kernel_sweep.py", "--smoke", "--out", str(table_path))
    table = ConfigTable.read(table_path)
    assert table.card == "interpreter"
    assert {(e.kind, e.pairs) for e in table.entries} == {(k, B * 4) for k in ("none", "ssc2") for B in (1, 3)}
    sweep = json.loads((tmp_path / "sweep" / "kernel_sweep.json").read_text())
    assert len(sweep["rows"]) == 2 * 2 * 2 and not sweep["skipped"]  # 2 kinds x 2 batches x 2 candidates

    text = _run("kernels.py", "--smoke", "--configs", str(table_path), "--out", str(tmp_path / "bench"))
    out = json.loads((tmp_path / "bench" / "kernels.json").read_text())
    assert out["config_table"].startswith(str(table_path)) and "NOT this card" not in out["config_table"]
    ran = {(r["agg"], r["B"]): r["config"] for r in out["rows"] if r["path"] == "triton"}
    for e in table.entries:
        agg = "none" if e.kind == "none" else "ssc"
        assert ran[(agg, e.pairs // 4)] == str(e.config)
    assert all(r["graph_ms"] is None and r["ms"] > 0 for r in out["rows"])
    assert "graph replay where measured" in text


def test_candidates_cover_the_config_space() -> None:
    """Per real shape and kind: more than one tile height and warp count; ssc tries one- and two-pass;
    grm tries two pipeline depths; v-heads per program only where HV > H; all distinct."""
    total = 0
    for name, s in SHAPES.items():
        G = s["HV"] // s["H"]
        for kind in KINDS:
            cs = candidates(s, kind)
            total += len(cs)
            assert len(set(cs)) == len(cs) >= 6, (name, kind)
            assert len({c.block_v for c in cs}) >= 3 and len({c.num_warps for c in cs}) >= 2, (name, kind)
            assert {c.heads_per_program for c in cs} == ({1, G} if G > 1 else {1}), (name, kind)
            if kind.startswith("ssc"):
                assert {c.two_pass for c in cs} == {True, False}
                assert max(c.tiles_per_program for c in cs if not c.two_pass) >= 4
            if kind == "grm":
                assert {c.num_stages for c in cs} == {2, 3} and all(c.two_pass for c in cs)
    assert total <= 170  # each is a compile: the sweep's compile phase has ~70 s on 15 workers
