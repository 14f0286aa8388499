"""scripts/mctrain/pick_core.py: the core a GPU chat run trains with, from fla_backward_check's rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mctrain.pick_core import pick

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mctrain" / "pick_core.py"


def result(checks: dict, trains: dict) -> dict:
    rows = [dict(row="check", case="chat", mode=m, passes=ok) for m, ok in checks.items()]
    rows.append(dict(row="check", case="recall", mode="lifted", passes=True))  # another case never counts
    for mode, tok in trains.items():
        row = dict(row="train", mode=None if mode == "torch" else mode, mode_after="graph")
        row.update(error="boom") if tok is None else row.update(tok_per_s=tok)
        rows.append(row)
    return dict(rows=rows)


def test_fla_wins_only_when_checked_and_faster_by_the_margin():
    assert pick(result({"ours": True}, {"torch": 100.0, "ours": 150.0}))[0] == [
        "--backend", "auto", "--fla-backward", "ours"]
    assert pick(result({"ours": True}, {"torch": 100.0, "ours": 105.0}))[0] == ["--backend", "torch"]
    assert pick(result({"ours": False}, {"torch": 100.0, "ours": 300.0}))[0] == ["--backend", "torch"]


def test_the_faster_passing_mode_wins_and_a_failed_or_eager_row_never_does():
    both = result({"ours": True, "lifted": True}, {"torch": 100.0, "ours": 150.0, "lifted": 200.0})
    assert pick(both)[0][-1] == "lifted"
    lifted_bad = result({"ours": True, "lifted": False}, {"torch": 100.0, "ours": 150.0, "lifted": 400.0})
    assert pick(lifted_bad)[0][-1] == "ours"
    crashed = result({"ours": True}, {"torch": 100.0, "ours": None})
    assert pick(crashed)[0] == ["--backend", "torch"]
    eager = result({"ours": True}, {"torch": 100.0, "ours": 150.0})
    eager["rows"][-1]["mode_after"] = "eager"
    assert pick(eager)[0] == ["--backend", "torch"]


def test_the_command_line_falls_back_to_torch_without_a_result(tmp_path):
    run = [sys.executable, str(SCRIPT)]
    out = subprocess.run([*run, str(tmp_path / "missing.json")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["--backend", "torch"]
    good = tmp_path / "fb.json"
    good.write_text(json.dumps(result({"ours": True}, {"torch": 100.0, "ours": 200.0})))
    out = subprocess.run([*run, str(good)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["--backend", "auto", "--fla-backward", "ours"]
