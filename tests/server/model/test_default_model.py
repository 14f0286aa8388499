"""The shipped default model (server/data/default_model/, trained by scripts/train.py, see docs/MODEL.md).

tests/server/data/heldout_sample.txt is text the model never trained on: the first paragraphs of the
held-out tails of austen.txt and web.txt (public domain) of ../shared/data/build_corpus.sh's corpus.
Its perplexity through the serving prefill path must stay below a threshold set from the measurement,
so that a broken loader, tokenizer or kernel fails here (random weights give ~vocabulary size).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from mcserve.server.model.default import SHIPPED_DIR, is_shipped
from mcserve.server.model.loader import load_config, load_model
from mcserve.server.text.tokenizer import Tokenizer

SAMPLE = Path(__file__).parents[1] / "data" / "heldout_sample.txt"
# Measured 163.7 for the shipped chat model (2026-12-02, CPU float32, exactly the computation of the
# test below), times ~1.15. Its text share was 30% of training against 100% for the text-only model it
# replaced (55.8 on this sample). The same weights with N(0, (0.1 std)^2) noise per tensor give 310.5,
# with 0.2 std 709.9; served as `none` they give 113.9 (lower: see the MC test below).
MAX_SAMPLE_PPL = 190.0
MAX_DIR_BYTES = 40 * 10**6



def test_the_trained_model_ships():
    assert is_shipped(), "server/data/default_model/ is missing: mcserve serve would fall back to random weights"


def test_default_model_is_small_and_uses_ssc_with_a_learned_router():
    size = sum(f.stat().st_size for f in SHIPPED_DIR.iterdir() if f.is_file())
    assert size < MAX_DIR_BYTES, size
    cfg = load_config(SHIPPED_DIR)
    assert (cfg.mc.aggregation, cfg.mc.router) == ("ssc", "learned")


def test_default_model_heldout_perplexity_below_threshold():
    tok = Tokenizer.from_dir(SHIPPED_DIR)
    model = load_model(SHIPPED_DIR, dtype="float32", device="cpu")
    ids = tok.encode(SAMPLE.read_text(encoding="utf-8"), add_special_tokens=False)
    assert len(ids) > 3 * model.spec.segment_size  # the sample crosses several checkpoints
    n_seg = len(ids) // model.spec.segment_size
    states, ckpts = model.allocate_states(1), model.allocate_checkpoints(n_seg)
    states.clear(0)
    logits, _ = model.prefill(ids, 0, 0, [], list(range(n_seg)), states, ckpts, all_logits=True)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    ppl = math.exp(float(nll))
    assert ppl < MAX_SAMPLE_PPL, f"held-out sample perplexity {ppl:.2f} >= {MAX_SAMPLE_PPL}"


# Issue 13: the shipped model must use its cache and answer a chat turn. The chat model shipped on
# 2026-12-02 (docs/MODEL.md) answers arithmetic and greetings, and the tests of those hold it to what
# it measured.
#
# Its cache lowers its loss on held-out documents: tests/server/data/mc_heldout_sources.json holds the
# first 1,024 tokens of the held-out tail of every public-domain source (scripts/build_mc_probe.py; the
# rule was fixed before measuring). Measured 2026-12-02, CPU float32, serving path, served as `none`
# minus its own ssc, nats per token: austen +0.0142, devil +0.0126, jargon +0.0264, kjv -0.0001, mhcc
# +0.0111, tdavid +0.0259, web +0.0105; mean +0.0144, 6 of 7 lower. (On a sample that splices two
# documents, tests/server/data/heldout_sample.txt, the cache of the first misleads the second and
# raises the loss by 0.36 nats: docs/MODEL.md, "What the cache does".)
MC_PROBE = Path(__file__).parents[1] / "data" / "mc_heldout_sources.json"
MIN_MC_MEAN_GAIN = 0.007  # half the measured mean
MIN_MC_SAMPLES_HELPED = 5  # of 7; measured 6
# measured 4 of 4; 3 leaves room for a near-tied greedy choice on another CPU
ARITHMETIC = (("What is 2 + 3?", 5), ("What is 4 + 4?", 8), ("What is 9 - 5?", 4), ("What is 3 x 3?", 9))
MIN_ARITHMETIC_CORRECT = 3
# (question, words of which the reply must hold one): measured 3 of 3
SMALL_TALK = (("Hello! Who are you?", ("model", "assistant", "mcserve")), ("Goodbye!", ("bye", "goodbye")),
              ("How are you today?", ("well", "good", "fine")))
MIN_SMALL_TALK_ON_TOPIC = 2
# It still does not copy a definition's headword from the question (0 of the 3 below), kept as a strict
# xfail (it fails as soon as it passes, so it cannot be forgotten; only an AssertionError counts).
DEFINITIONS = (("What does happiness mean?", "happiness"), ("Define courage.", "courage"),
               ('What does the word "river" mean?', "river"))
MIN_DEFINITIONS_ON_TOPIC = 2
NO_HEADWORD = "issue 13: the shipped chat model does not copy a definition's headword from the question"


def _serving_nll(model, ids: list[int]) -> float:
    """Mean next-token NLL of one sequence through the serving prefill path (a checkpoint block per
    segment boundary)."""
    n_seg = len(ids) // model.spec.segment_size
    states, ckpts = model.allocate_states(1), model.allocate_checkpoints(n_seg)
    states.clear(0)
    logits, _ = model.prefill(ids, 0, 0, [], list(range(n_seg)), states, ckpts, all_logits=True)
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))


def test_memory_caching_lowers_the_loss_on_held_out_documents():
    """Served as `none` (no checkpoint read), the loss on held-out documents must be higher than with the
    model's own aggregation: by MIN_MC_MEAN_GAIN on average, and on MIN_MC_SAMPLES_HELPED samples."""
    import json

    tok = Tokenizer.from_dir(SHIPPED_DIR)
    own = load_model(SHIPPED_DIR, dtype="float32", device="cpu")
    none = load_model(SHIPPED_DIR, dtype="float32", device="cpu", aggregation="none")
    assert own.spec.reads_cache
    gains = {}
    for name, text in json.loads(MC_PROBE.read_text(encoding="utf-8"))["samples"].items():
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > 8 * own.spec.segment_size, name
        gains[name] = _serving_nll(none, ids) - _serving_nll(own, ids)
    mean = sum(gains.values()) / len(gains)
    helped = sum(g > 0 for g in gains.values())
    assert mean >= MIN_MC_MEAN_GAIN and helped >= MIN_MC_SAMPLES_HELPED, (mean, gains)


def _answers(questions: list[str]) -> list[str]:
    from mcserve.server.engine.llm import LLM
    from mcserve.server.engine.sampling_params import SamplingParams

    tok = Tokenizer.from_dir(SHIPPED_DIR)
    prompts = [tok.encode(tok.apply_chat_template([dict(role="user", content=q)]), add_special_tokens=False)
               for q in questions]
    llm = LLM(SHIPPED_DIR, device="cpu", max_num_seqs=8)
    params = SamplingParams(max_tokens=32, temperature=0.0, repetition_penalty=1.1)
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def _number(reply: str) -> int | None:
    """The first integer after the first '=', else the only integer of the reply (several: None)."""
    if "=" in reply:
        found = re.findall(r"-?\d+", reply.split("=", 1)[1])
        return int(found[0]) if found else None
    found = re.findall(r"-?\d+", reply)
    return int(found[0]) if len(found) == 1 else None


@pytest.fixture(scope="module")
def replies() -> dict[str, str]:
    """One batched greedy generation for every prompt of the tests below (the engine's cost is per call)."""
    questions = [q for q, _ in ARITHMETIC + SMALL_TALK + DEFINITIONS]
    return dict(zip(questions, _answers(questions), strict=True))


def test_default_model_answers_arithmetic(replies):
    right = [_number(replies[q]) == a for q, a in ARITHMETIC]
    assert sum(right) >= MIN_ARITHMETIC_CORRECT, [(q, replies[q]) for q, _ in ARITHMETIC]


def test_default_model_makes_small_talk(replies):
    on_topic = [any(re.search(rf"\b{w}\b", replies[q], re.I) for w in words) for q, words in SMALL_TALK]
    assert sum(on_topic) >= MIN_SMALL_TALK_ON_TOPIC, [(q, replies[q]) for q, _ in SMALL_TALK]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NO_HEADWORD)
def test_default_model_defines_the_word_it_was_asked(replies):
    # on topic: the reply names the headword and says more than the question did
    on_topic = [re.search(rf"\b{w}\b", replies[q], re.I) is not None
                and len(set(replies[q].lower().split()) - set(q.lower().split())) >= 3 for q, w in DEFINITIONS]
    assert sum(on_topic) >= MIN_DEFINITIONS_ON_TOPIC, [(q, replies[q]) for q, _ in DEFINITIONS]
