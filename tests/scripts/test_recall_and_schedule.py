"""MQAR sequence layout, batch masks and the learning-rate schedule of the training scripts."""

from __future__ import annotations

import numpy as np
import pytest
from mctrain.recall import RecallTask
from mctrain.schedule import CosineSchedule, plan_total_steps

TASK = RecallTask(vocab_size=1000, kv_id=3, query_id=4)


def test_recall_sequence_layout():
    rng = np.random.default_rng(0)
    text = np.arange(5000, 5000 + 120)  # recognisable filler ids
    seq = TASK.make(rng, text, n_pairs=6, gap=20, prefix=7, n_queries=4)
    ids = seq.ids
    assert len(ids) == 120 and ids[7] == TASK.kv_id
    keys, values = ids[8:20:2], ids[9:20:2]
    assert len(set(keys.tolist())) == 6
    assert all(TASK.key_range[0] <= k < TASK.key_range[1] for k in keys)
    assert all(TASK.value_range[0] <= v < TASK.value_range[1] for v in values)
    assert (ids[20:40] == text[20:40]).all() and (ids[:7] == text[:7]).all()  # prefix and gap keep the text
    assert ids[40] == TASK.query_id
    for pos, ans, dist in zip(seq.query_pos, seq.answers, seq.distance, strict=True):
        j = int(np.where(keys == ids[pos])[0][0])  # which pair this query asks
        assert ids[pos + 1] == ans == values[j]
        assert dist == pos - (8 + 2 * j)
    assert (ids[49:] == text[49:]).all()


def test_recall_sequence_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        TASK.make(np.random.default_rng(0), np.zeros(30, dtype=np.int64), n_pairs=8, gap=0, prefix=0)


def test_training_samples_cover_positions_and_pair_counts():
    rng = np.random.default_rng(1)
    seqs = [TASK.sample_train(rng, np.zeros(513, dtype=np.int64), max_pairs=64) for _ in range(300)]
    counts = [len(s.answers) for s in seqs]
    assert min(counts) == 2 and max(counts) > 40
    starts = [int(np.where(s.ids == TASK.kv_id)[0][0]) for s in seqs]
    assert min(starts) < 50 and max(starts) > 300


def test_cosine_schedule_and_step_plan():
    s = CosineSchedule(1e-3, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(9) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(0.55e-3) and s.lr(110) == pytest.approx(1e-4)
    assert plan_total_steps(40, elapsed_s=20.0, step_time_s=0.1, budget_s=120.0, reserve_frac=0.1) == 40 + 900
    assert plan_total_steps(40, elapsed_s=200.0, step_time_s=0.1, budget_s=120.0, min_steps=40) == 40
