"""Pure MQAR sequences and curriculum, the decay inits, and chat rendering with its assistant-only mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mctrain import chat_data, chat_eval, mqar
from mctrain.checkpoint import init_model, train_config
from mctrain.corpus import SPECIAL_TOKENS

from mcserve.server.text.tokenizer import Tokenizer
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe

TASK = mqar.MQARTask(seq_len=200, n_filler=10, n_keys=40, n_values=30, max_prefix=12)


def test_mqar_sequence_layout_and_id_ranges():
    rng = np.random.default_rng(0)
    for n in (1, 7, TASK.max_pairs):
        seq = TASK.make(rng, n)
        ids = seq.ids
        assert len(ids) == 200 and len(seq.query_pos) == n
        keys = ids[(ids >= 10) & (ids < 50)]
        values = ids[ids >= 50]
        assert len(keys) == len(values) == 2 * n  # each key once as a pair, once as a query; no filler collides
        p = int(np.flatnonzero(ids >= 10)[0])  # the first pair's key
        assert p <= TASK.max_prefix
        pair_of = {int(ids[p + 2 * i]): (p + 2 * i, int(ids[p + 2 * i + 1])) for i in range(n)}
        assert len(pair_of) == n  # distinct keys
        asked = set()
        for q, ans, dist in zip(seq.query_pos, seq.answers, seq.distance, strict=True):
            kpos, value = pair_of[int(ids[q])]
            assert ids[q + 1] == ans == value and dist == q - kpos and q >= p + 2 * n
            asked.add(int(ids[q]))
        assert asked == set(pair_of)  # every key asked once
        assert (np.diff(np.sort(seq.query_pos)) >= 2).all()


def test_mqar_batch_targets_only_the_query_keys():
    ids, tgt = mqar.batch(TASK, np.random.default_rng(1), [3, 9])
    assert ids.shape == tgt.shape == (2, 200)
    for r, n in enumerate((3, 9)):
        pos = np.flatnonzero(tgt[r] >= 0)
        assert len(pos) == n and (tgt[r, pos] == ids[r, pos + 1]).all() and (tgt[r, pos] >= 50).all()


def test_mqar_refuses_too_many_pairs():
    with pytest.raises(ValueError, match="n_pairs"):
        TASK.make(np.random.default_rng(0), TASK.max_pairs + 1)


def test_pair_curriculum_ramps_the_cap_then_samples_log_uniformly():
    cur = mqar.PairCurriculum(min_pairs=2, start_pairs=8, max_pairs=128, ramp_steps=100)
    assert cur.cap(0) == 8 and cur.cap(50) == 32 and cur.cap(100) == cur.cap(10**6) == 128
    rng = np.random.default_rng(0)
    early = [cur.sample(rng, 0) for _ in range(500)]
    late = [cur.sample(rng, 200) for _ in range(4000)]
    assert min(early) == 2 and max(early) == 8 and max(late) == 128
    # log-uniform: about as many counts in [2, 16) as in [16, 128]
    low = sum(n < 16 for n in late) / len(late)
    assert 0.4 < low < 0.6, low


def test_slow_decay_init_keeps_the_state_for_hundreds_of_tokens():
    cfg = train_config("recall", 300, 0, "grm", 32, 4)
    fla, slow = init_model(cfg, 3, "fla"), init_model(cfg, 3, "slow")

    def log_decay(model) -> torch.Tensor:  # per-token log-decay at zero input: exp(A_log) * softplus(dt_bias)
        return torch.cat([b.attn.A_log.exp() * torch.nn.functional.softplus(b.attn.dt_bias)
                          for b in model.model.layers]).detach()

    s = log_decay(slow)
    assert ((s >= 1e-3 * 0.99) & (s <= 1e-2 * 1.01)).all(), s  # A = 1, dt in [1e-3, 1e-2]
    assert log_decay(fla).median() > 10 * s.median()
    same = [n for n, t in slow.state_dict().items() if not n.endswith(("A_log", "dt_bias"))]
    assert all(torch.equal(slow.state_dict()[n], fla.state_dict()[n]) for n in same)
    none = init_model(train_config("recall", 300, 0, "none", 32, 4), 3, "slow").state_dict()
    assert all(torch.equal(t, slow.state_dict()[n]) for n, t in none.items())  # grm and none start alike
    with pytest.raises(ValueError, match="decay_init"):
        init_model(cfg, 0, "fast")


@pytest.fixture(scope="module")
def tok():
    backend = train_byte_level_bpe(builtin_corpus(), 400, SPECIAL_TOKENS, split_digits=True)
    return Tokenizer(backend)


def test_chat_rendering_scores_exactly_the_assistant_content_and_its_end(tok):
    convs = [[dict(role="system", content="Be brief."), dict(role="user", content="What is 12 + 30?"),
              dict(role="assistant", content="12 + 30 = 42."), dict(role="user", content="Thanks!"),
              dict(role="assistant", content="You're welcome!")],
             [dict(role="user", content="Hello"), dict(role="assistant", content="Hi there.")]]
    template = lambda ms: tok.apply_chat_template(ms, add_generation_prompt=False)  # noqa: E731
    ids, mask = chat_data.encode_all(tok.backend, template, convs)
    text = "".join(template(c) + "<|endoftext|>" for c in convs)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text  # the served rendering, token for token
    scored = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert scored == "12 + 30 = 42.<|im_end|>You're welcome!<|im_end|>Hi there.<|im_end|>"
    assert tok.backend.encode("42").tokens == ["4", "2"]  # digits never merge
    eot = tok.token_to_id("<|endoftext|>")
    assert (ids == eot).sum() == 2 and not mask[ids == eot].any()


def test_chat_data_round_trip_and_windows(tok, tmp_path):
    from mctrain.token_data import TOKENIZER_DIR

    from mcserve.server.text.tokenizer_train import write_tokenizer_files

    write_tokenizer_files(tmp_path / TOKENIZER_DIR, tok.backend, bos=SPECIAL_TOKENS[0], eos=SPECIAL_TOKENS[0])
    convs = [[dict(role="user", content=f"What is {a} + 1?"), dict(role="assistant", content=f"{a} + 1 = {a + 1}.")]
             for a in range(40)]
    template = lambda ms: tok.apply_chat_template(ms, add_generation_prompt=False)  # noqa: E731
    meta = chat_data.write(tmp_path, tok.backend, template, convs[:30], convs[30:], {"arith": {"train": 30}})
    data = chat_data.ChatData.load(tmp_path)
    assert len(data.ids) == meta["train"]["tokens"] and int(data.mask.sum()) == meta["train"]["scored"] > 0
    ids, mask = chat_data.encode_all(tok.backend, template, convs[:30])
    assert (data.ids == ids).all() and (data.mask == mask).all()
    w_ids, w_mask = data.sample_windows(np.random.default_rng(0), 3, 17)
    assert w_ids.shape == w_mask.shape == (3, 17) and w_mask.dtype == np.float32
    assert len(data.heldout_windows(17)) == len(data.held_ids) // 17


def test_chat_eval_answer_parsing_and_problem_split():
    assert chat_eval.answer_number("2 + 3 = 5.") == 5
    assert chat_eval.answer_number("It is 5") == 5 and chat_eval.answer_number("no idea") is None
    assert chat_eval.on_topic("Happiness means joy.", ("happiness",)) and not chat_eval.on_topic("15", ("5",))
    held = chat_eval.arithmetic_problems(True, 10**6)
    trained = chat_eval.arithmetic_problems(False, 10**6)
    assert not {q for q, _ in held} & {q for q, _ in trained}
    assert 0.005 < len(held) / (len(held) + len(trained)) < 0.02  # the 1% held-out share
    small = chat_eval.arithmetic_problems(False, 10**6, max_operand=20)
    assert all(max(map(int, q[8:-1].replace("x", "*").split(f" {q.split()[3]} "))) <= 20 for q, _ in small)
    assert math.isclose(len(chat_eval.PROMPTS), 20)


def test_recall_experiment_trains_both_models_alike_and_evaluates_them_served_three_ways(tmp_path):
    import json

    import recall_experiment

    task = ["--seq-len", "48", "--n-filler", "8", "--n-keys", "16", "--n-values", "16", "--max-prefix", "4"]
    for agg in ("grm", "none"):
        recall_experiment.main(["train", *task, "--size", "recall-small", "--aggregation", agg, "--out",
                                str(tmp_path / agg), "--segment-size", "8", "--steps", "6", "--batch-size", "4",
                                "--max-pairs", "8", "--log-every", "3", "--eval-every", "6", "--device", "cpu"])
    logs = {agg: [json.loads(x) for x in (tmp_path / agg / "log.jsonl").read_text().splitlines()]
            for agg in ("grm", "none")}
    # the same batches and schedule: the pair cap and the step count agree
    caps = {agg: [r["pair_cap"] for r in rows if r["event"] == "train"] for agg, rows in logs.items()}
    assert caps["grm"] == caps["none"] and len(caps["grm"]) == 2
    res = recall_experiment.main(["eval", *task, "--model", f"grm={tmp_path / 'grm' / 'model'}",
                                  "--model", f"none={tmp_path / 'none' / 'model'}", "--pairs", "2,8",
                                  "--per-count", "2", "--device", "cpu", "--out", str(tmp_path / "eval.json"),
                                  "--md", str(tmp_path / "eval.md")])
    assert list(res["models"]) == ["grm", "grm-as-ssc", "grm-as-none", "none"]
    assert [m["served_aggregation"] for m in res["models"].values()] == ["grm", "ssc", "none", "none"]
    for m in res["models"].values():
        r = m["recall"]
        assert r["n_pairs"] == [2, 8] and r["queries_by_pairs"] == [4, 16] and sum(r["distance_count"]) == 20
    assert "| grm-as-none | none |" in (tmp_path / "eval.md").read_text()
