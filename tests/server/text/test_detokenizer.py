"""The detokenizer's DecodeStream path against its window path and against decoding everything at
once: random token streams (valid text and a weak model's junk), pushed in pieces of odd sizes, with
and without stop strings."""

from __future__ import annotations

import random
from functools import partial

import pytest
from tokenizers.decoders import DecodeStream

from mcserve.server.model.default import default_model_dir
from mcserve.server.text.detokenizer import MAX_PENDING, IncrementalDetokenizer
from mcserve.server.text.tokenizer import Tokenizer
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe

TEXTS = ["héllo 日本語 wörld ☕ naïve café", "The quick brown fox jumps over the lazy dog.", "數據 😀 ok\n\tend"]


@pytest.fixture(scope="module", params=["default", "bpe300"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "default":
        return Tokenizer.from_dir(default_model_dir())
    return Tokenizer(train_byte_level_bpe(builtin_corpus(), 300), eos_token="<|endoftext|>")


def _window(tok: Tokenizer, **kw) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(partial(tok.backend.decode, skip_special_tokens=True), **kw)


def _run(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> str:
    out, i = [], 0
    while i < len(ids):
        k = rng.choice((1, 1, 1, 2, 3, 7))
        out.append(detok.push(ids[i : i + k]))
        i += k
    return "".join(out) + detok.flush()


def _streams(tok: Tokenizer, rng: random.Random) -> list[list[int]]:
    valid = [tok.encode(t * rng.randint(1, 3), add_special_tokens=False) for t in TEXTS]
    junk = [[rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(60)]
    return valid + junk


def test_both_paths_equal_the_whole_decode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for ids in _streams(tok, rng):
        whole = tok.backend.decode(ids)
        seed = rng.random()
        assert _run(tok.detokenizer(), ids, random.Random(seed)) == whole
        assert _run(_window(tok), ids, random.Random(seed)) == whole


def test_both_paths_agree_with_a_prompt_and_stop_strings(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for ids in _streams(tok, rng):
        prompt = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 9))]
        whole = tok.backend.decode(ids)
        stop = whole[len(whole) // 2 : len(whole) // 2 + 2] or "x"
        kw = dict(prompt_ids=prompt, stop=[stop, "never"])
        seed = rng.random()
        fast, slow = tok.detokenizer(**kw), _window(tok, **kw)
        assert _run(fast, ids, random.Random(seed)) == _run(slow, ids, random.Random(seed))
        assert fast.stop_reason == slow.stop_reason


def test_bytes_that_form_no_character_are_emitted_not_held_forever(tok: Tokenizer) -> None:
    lead = next(i for i in range(3, tok.vocab_size) if tok.token_bytes(i) in (b"\xe6", b"\xe3", b"\xe5"))
    ds = DecodeStream(skip_special_tokens=True)
    assert all(ds.step(tok.backend, lead) is None for _ in range(40)), "what DecodeStream alone does"
    detok = tok.detokenizer()
    texts = [detok.push(lead) for _ in range(40)]
    assert "".join(texts).count("\ufffd") >= 40 - MAX_PENDING - 1, "bounded hold"
    assert "".join(texts) + detok.flush() == tok.backend.decode([lead] * 40)
