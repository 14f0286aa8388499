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


def test_repeat_task_writes_the_span_twice_and_fits_every_window():
    from mctrain.repeat import RepeatTask

    task = RepeatTask(min_span=4, max_span=40, max_gap=8)
    text = np.arange(100, 165)
    seq = task.make(text, span=10, gap=3, start=5)
    assert seq.copy_start == 18 and seq.span == 10
    assert (seq.ids[18:28] == text[5:15]).all() and (seq.ids[:18] == text[:18]).all()
    assert (seq.ids[28:] == text[28:]).all()
    with pytest.raises(ValueError, match="does not fit"):
        task.make(text, span=30, gap=6, start=0)
    rng = np.random.default_rng(0)
    spans = []
    for W in (9, 33, 65, 200):
        for _ in range(200):
            s = task.sample(rng, np.arange(W))
            c, L = s.copy_start, s.span
            assert 1 <= L <= 40 and c + L <= W
            start = int(np.flatnonzero(np.arange(W) == s.ids[c])[0])  # the text is arange: ids name positions
            assert (s.ids[c:c + L] == np.arange(start, start + L)).all() and start + L <= c
            assert c - (start + L) <= 8  # the gap
            spans.append(L)
    assert min(spans) <= 5 and max(spans) >= 30  # log-uniform over the whole range where it fits
    with pytest.raises(ValueError):
        RepeatTask(min_span=5, max_span=4)


def test_batches_repeat_rows_copy_a_span_and_leave_the_other_rows_as_they_were(data_dir):
    from mctrain.batches import BatchSampler
    from mctrain.recall import RecallTask
    from mctrain.repeat import RepeatTask

    data = TokenData.load(data_dir)
    task = RecallTask(data.vocab_size, kv_id=3, query_id=4)
    kw = dict(batch_size=10, seq_len=64, recall_frac=0.2, max_pairs=8, seed=3)
    plain = BatchSampler(data, task, **kw).next()
    sampler = BatchSampler(data, task, **kw, repeat_frac=0.3, repeat=RepeatTask(min_span=12, max_span=30))
    assert sampler.repeat_rows == slice(2, 5)
    got = sampler.next()
    rows = [0, 1, 5, 6, 7, 8, 9]
    assert torch.equal(got.inputs[rows], plain.inputs[rows]) and torch.equal(got.lm_mask, plain.lm_mask)
    full = torch.cat([got.inputs, got.targets[:, -1:]], 1).numpy()
    before = torch.cat([plain.inputs, plain.targets[:, -1:]], 1).numpy()
    for r in range(2, 5):
        changed = np.flatnonzero(full[r] != before[r])
        assert len(changed) > 0 and changed[-1] - changed[0] < 30  # one span overwritten
        a, b = changed[0], changed[-1] + 1
        assert any((full[r][s:s + b - a] == full[r][a:b]).all() for s in range(0, a - (b - a) + 1))
    with pytest.raises(ValueError, match="sum <= 1"):
        BatchSampler(data, task, **dict(kw, recall_frac=0.8), repeat_frac=0.3)


def test_repeat_gain_is_the_loss_served_as_none_minus_the_own_aggregation(data_dir):
    from mctrain.checkpoint import init_model, train_config
    from mctrain.evaluation import masked_nll, repeat_gain, repeat_windows
    from mctrain.repeat import RepeatTask

    data = TokenData.load(data_dir)
    held = data.heldout
    wins = repeat_windows(RepeatTask(max_span=200), held, 81, 3, gap=5)
    ids, mask = wins[0]
    assert (ids[43:81] == ids[0:38]).all() and mask.sum() == 37 and mask[44:81].all() and not mask[:44].any()
    ssc = init_model(train_config("tiny", data.vocab_size, 0, "ssc", 16, 2), seed=1).eval()
    none = init_model(train_config("tiny", data.vocab_size, 0, "none", 16, 2), seed=1).eval()
    got = repeat_gain(ssc, wins, autocast_dtype=None, backend="torch")
    assert got["own"] == pytest.approx(masked_nll(ssc, wins, autocast_dtype=None, backend="torch")["loss"])
    # the same GDN weights without a router: what the ssc model computes served as `none`
    assert got["none"] == pytest.approx(masked_nll(none, wins, autocast_dtype=None, backend="torch")["loss"], rel=1e-5)
    assert got["gain"] == pytest.approx(got["none"] - got["own"]) and abs(got["gain"]) > 1e-6
    assert repeat_gain(none, wins, autocast_dtype=None, backend="torch")["gain"] == 0.0


def test_init_from_starts_at_the_given_weights_and_refuses_another_shape(data_dir, tmp_path):
    from safetensors.torch import load_file

    args = ["--data-dir", str(data_dir), "--aggregation", "ssc", "--segment-size", "16", "--seq-len", "32",
            "--batch-size", "4", "--warmup", "1", "--evals", "1", "--eval-windows", "1", "--recall-max-pairs", "4",
            "--log-every", "1", "--device", "cpu", "--save-dtype", "fp32"]
    train.main([*args, "--size", "tiny", "--steps", "3", "--lr", "1e-2", "--out", str(tmp_path / "a")])
    src = tmp_path / "a" / "model"
    # lr 1e-30: AdamW moves nothing visible (weight decay is scaled by the lr too), so the result is the source
    train.main([*args, "--size", "tiny", "--steps", "1", "--lr", "1e-30", "--repeat-frac", "0.5", "--init-from",
                str(src), "--seed", "5", "--out", str(tmp_path / "b")])
    a = load_file(src / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-20) for k in a)
    fresh = train.main([*args, "--size", "tiny", "--steps", "1", "--lr", "1e-30", "--seed", "5",
                        "--out", str(tmp_path / "c")])
    c = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert not all(torch.allclose(a[k], c[k], rtol=0, atol=1e-20) for k in a) and fresh["steps"] == 1
    with pytest.raises(SystemExit, match="tensors differ"):
        train.main([*args, "--size", "default", "--steps", "1", "--init-from", str(src), "--out", str(tmp_path / "d")])
    (tmp_path / "e").mkdir()
    for f in src.iterdir():
        (tmp_path / "e" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "e" / "tokenizer.json").write_text((src / "tokenizer.json").read_text().replace('"a"', '"A"', 1))
    with pytest.raises(SystemExit, match="tokenizer"):
        train.main([*args, "--size", "tiny", "--steps", "1", "--init-from", str(tmp_path / "e"),
                    "--out", str(tmp_path / "f")])
