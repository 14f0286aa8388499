"""--save-state / --resume (scripts/mctrain/train_state.py): a run cut and resumed equals the uncut run."""

from __future__ import annotations

import json

import pytest
import recall_experiment
import torch
from safetensors.torch import load_file

ARGS = ["train", "--size", "recall-small", "--aggregation", "grm", "--seq-len", "48", "--segment-size", "16",
        "--n-filler", "16", "--n-keys", "32", "--n-values", "32", "--max-prefix", "4", "--batch-size", "3",
        "--steps", "6", "--warmup", "2", "--min-pairs", "2", "--start-pairs", "4", "--max-pairs", "8",
        "--log-every", "1", "--eval-every", "100", "--device", "cpu"]


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def test_recall_run_cut_and_resumed_equals_the_uncut_run(tmp_path):
    straight = tmp_path / "straight"
    recall_experiment.main([*ARGS, "--out", str(straight)])
    cut, state = tmp_path / "cut", tmp_path / "cut" / "state.pt"
    first = recall_experiment.main([*ARGS, "--out", str(cut), "--pause-at", "3", "--save-state", str(state)])
    assert first["steps_done"] == 3 and first["stopped_early"] and state.is_file()
    second = recall_experiment.main([*ARGS, "--out", str(cut), "--resume", str(state), "--save-state", str(state)])
    assert second["steps_done"] == 6 and not second["stopped_early"]
    assert not state.exists()  # finished: nothing left to resume
    assert losses(cut) == losses(straight) and len(losses(straight)) == 6
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    state = tmp_path / "state.pt"
    recall_experiment.main([*ARGS, "--out", str(tmp_path / "a"), "--pause-at", "1", "--save-state", str(state)])
    with pytest.raises(SystemExit, match="batch_size"):
        recall_experiment.main([*ARGS[:-2], "--device", "cpu", "--batch-size", "4", "--out", str(tmp_path / "a"),
                                "--resume", str(state)])
