"""A 30-step CPU run of scripts/train.py on a tiny model: loss falls and the checkpoint serves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train
from mctrain.corpus import SPECIAL_TOKENS, read_corpus
from mctrain.mc_forward import forward_logits
from mctrain.token_data import TOKENIZER_DIR, TokenData, build_token_data

from mcserve.server.model.loader import load_model
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe, write_tokenizer_files
from tests.server.model.helpers import rel_err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two sources cut from the package's sample text, a 512-token BPE, and their token arrays."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus"
    corpus.mkdir()
    paras = builtin_corpus()
    half = len(paras) // 2
    (corpus / "a.txt").write_text("\n\n".join(paras[:half]))
    (corpus / "b.txt").write_text("\n\n".join(paras[half:]))
    sources = read_corpus(corpus, heldout_frac=0.05, weights={"a": 2.0})
    tok = train_byte_level_bpe((s.train_text for s in sources), 512, SPECIAL_TOKENS)
    write_tokenizer_files(root / TOKENIZER_DIR, tok, bos=SPECIAL_TOKENS[0], eos=SPECIAL_TOKENS[0])
    build_token_data(sources, root)
    return root


def test_token_data_round_trip(data_dir):
    data = TokenData.load(data_dir)
    assert [s["name"] for s in data.sources] == ["a", "b"]
    assert data.train.dtype == np.uint16 and data.train.max() < data.vocab_size
    probs = data.source_probs(65)
    a, b = data.sources
    assert probs[0] / probs[1] == pytest.approx(2.0 * (a["train"][1] - 65) / (b["train"][1] - 65))
    win = data.sample_windows(np.random.default_rng(0), 5, 65)
    assert win.shape == (5, 65)


def test_thirty_steps_reduce_loss_and_save_a_servable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = train.main(["--data-dir", str(data_dir), "--out", str(out), "--size", "tiny", "--aggregation", "ssc",
                          "--segment-size", "16", "--top-k", "2", "--seq-len", "64", "--batch-size", "8",
                          "--steps", "30", "--lr", "1e-2", "--warmup", "5", "--evals", "2", "--eval-windows", "2",
                          "--recall-max-pairs", "8", "--log-every", "5", "--device", "cpu"])
    assert summary["steps"] == 30 and not summary["stopped_early"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert len(train_rows) == 6 and len([r for r in rows if r["event"] == "eval"]) == 2
    assert train_rows[-1]["lm_loss"] < train_rows[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in train_rows]

    model = load_model(out / "model", dtype=torch.float32)
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["memory_caching"] == dict(aggregation="ssc", segment_size=16, top_k=2, state_init="continue",
                                         router="learned")
    assert (out / "model" / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((out / "model" / "tokenizer_config.json").read_text())
    ids = torch.as_tensor(TokenData.load(data_dir).heldout[:40].astype(np.int64))
    got = forward_logits(model, ids[None], backend="torch")[0].detach()
    assert rel_err(got, model.forward_reference(ids)) < 1e-4


def test_batches_score_text_rows_fully_and_recall_rows_on_answers_only(data_dir):
    from mctrain.batches import BatchSampler
    from mctrain.recall import RecallTask

    data = TokenData.load(data_dir)
    task = RecallTask(data.vocab_size, kv_id=3, query_id=4)
    batch = BatchSampler(data, task, batch_size=10, seq_len=64, recall_frac=0.2, max_pairs=8, seed=0).next()
    assert batch.inputs.shape == batch.targets.shape == (10, 64)
    assert (batch.inputs[:, 1:] == batch.targets[:, :-1]).all()
    assert (batch.lm_mask[:2] == 0).all() and (batch.lm_mask[2:] == 1).all()
    assert (batch.recall_mask[2:] == 0).all() and (batch.recall_mask[:2].sum(1) >= 2).all()
    lo, hi = task.value_range
    answers = batch.targets[batch.recall_mask.bool()]
    assert ((answers >= lo) & (answers < hi)).all()
    assert (batch.inputs[:2] == task.query_id).sum() == 2


def test_ssc_and_none_models_of_one_seed_share_every_gdn_weight():
    from mctrain.checkpoint import init_model, train_config

    ssc = init_model(train_config("tiny", 300, 0, "ssc", 16, 2), seed=7).state_dict()
    none = init_model(train_config("tiny", 300, 0, "none", 16, 2), seed=7).state_dict()
    assert set(ssc) - set(none) == {f"model.layers.{i}.attn.u_proj.weight" for i in range(2)}
    for name, t in none.items():
        assert torch.equal(t, ssc[name]), name
    assert ssc["model.layers.0.attn.u_proj.weight"].std() > 0.01


def test_train_cut_and_resumed_equals_the_uncut_run(data_dir, tmp_path):
    """6 steps straight == 3 steps, --save-state, --resume, 3 more steps: same losses, same weights (CPU fp32)."""
    from safetensors.torch import load_file

    args = ["--data-dir", str(data_dir), "--size", "tiny", "--aggregation", "ssc", "--segment-size", "16",
            "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "2", "--evals", "1",
            "--eval-windows", "1", "--recall-max-pairs", "4", "--log-every", "1", "--device", "cpu",
            "--save-dtype", "fp32"]
    train.main([*args, "--out", str(tmp_path / "straight")])
    state = tmp_path / "state.pt"
    cut = train.main([*args, "--out", str(tmp_path / "cut"), "--pause-at", "3", "--save-state", str(state)])
    assert cut["steps"] == 3 and cut["stopped_early"]
    done = train.main([*args, "--out", str(tmp_path / "cut"), "--resume", str(state)])
    assert done["steps"] == 6 and not done["stopped_early"]

    def lm_losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return [r["lm_loss"] for r in rows if r["event"] == "train"]

    assert lm_losses("cut") == lm_losses("straight") and len(lm_losses("straight")) == 6
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replan_lengthens_a_time_budget_run_whose_steps_got_faster(data_dir, tmp_path, monkeypatch):
    """--replan: steps slow during the probe (a shared card), fast afterwards -> more steps planned."""
    import time

    from mctrain.train_step import TrainStep

    calls = []
    real_call = TrainStep.__call__

    def slow_at_first(self, batch, lr):
        calls.append(1)
        if len(calls) <= 8:
            time.sleep(0.15)
        return real_call(self, batch, lr)

    monkeypatch.setattr(TrainStep, "__call__", slow_at_first)
    monkeypatch.setattr(train, "PROBE_START", 4)
    monkeypatch.setattr(train, "PROBE_END", 8)
    out = tmp_path / "run"
    summary = train.main(["--data-dir", str(data_dir), "--out", str(out), "--size", "tiny", "--seq-len", "32",
                          "--batch-size", "1", "--segment-size", "8", "--time-budget", "14", "--max-seconds", "5.5",
                          "--replan", "--log-every", "2", "--warmup", "2", "--evals", "1", "--eval-windows", "1",
                          "--recall-frac", "0", "--device", "cpu"])
    plans = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    plans = [r for r in plans if r["event"] == "plan"]
    assert len(plans) >= 2 and plans[1]["replanned_from"] == plans[0]["total_steps"]
    assert plans[-1]["total_steps"] > plans[0]["total_steps"] and summary["planned_steps"] == plans[-1]["total_steps"]
