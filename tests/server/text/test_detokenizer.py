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


def _no_table(tok: Tokenizer, skip: bool, **kw) -> IncrementalDetokenizer:
    """The DecodeStream path without the per-token text table."""
    def stream(context: list[int]):
        return partial(DecodeStream(ids=context, skip_special_tokens=skip).step, tok.backend)

    return IncrementalDetokenizer(partial(tok.backend.decode, skip_special_tokens=skip), stream=stream, **kw)


def test_the_token_text_table_is_each_whole_token_alone(tok: Tokenizer) -> None:
    texts = tok._whole_texts
    assert texts is not None and len(texts) == tok.vocab_size  # both are byte-level BPE
    added = tok.backend.get_added_tokens_decoder()
    whole = [i for i, t in enumerate(texts) if t is not None]
    assert len(whole) > tok.vocab_size // 2 and not set(whole) & set(added)
    assert all(texts[i] == tok.backend.decode([i]) and "\ufffd" not in texts[i] for i in whole)
    partial_char = [i for i in range(tok.vocab_size) if i not in added and tok.token_bytes(i) in (b"\xe6", b"\xe3")]
    assert partial_char and all(texts[i] is None for i in partial_char)


@pytest.mark.parametrize("skip", [True, False])
def test_one_token_pushes_with_the_table_equal_the_stream_and_the_window(tok: Tokenizer, skip: bool) -> None:
    """The engine's path (one id per push, stop strings on and off by min_tokens): the table's shortcut
    against the stream alone and the window, over multi-byte text, junk and special tokens in between."""
    rng = random.Random(2)
    specials = sorted(tok.backend.get_added_tokens_decoder())
    for n, ids in enumerate(_streams(tok, rng)):
        ids = list(ids)
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        prompt = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(0, 6))] or None
        whole = tok.backend.decode(ids, skip_special_tokens=skip)
        stops = [whole[len(whole) // 3 : len(whole) // 3 + 2] or "x", "never"] if n % 2 else []
        kw = dict(prompt_ids=prompt, stop=stops, include_stop_str_in_output=n % 4 == 3)
        dets = [tok.detokenizer(skip_special_tokens=skip, **kw), _no_table(tok, skip, **kw),
                IncrementalDetokenizer(partial(tok.backend.decode, skip_special_tokens=skip), **kw)]
        min_tokens = rng.choice((0, 0, 2, 5))
        outs = []
        for d in dets:
            pieces = [d.push(t, check_stop=i + 1 >= min_tokens) for i, t in enumerate(ids)]
            outs.append(("".join(pieces) + d.flush(), d.stop_reason))
        assert outs[0] == outs[1] == outs[2], (n, ids)
        if prompt is None and not stops:
            assert outs[0][0] == whole
