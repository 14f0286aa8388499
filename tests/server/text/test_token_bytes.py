"""Token bytes: the bytes of an encoding's tokens, joined, are the text's UTF-8 (byte-level BPE and a
SentencePiece-style byte-fallback vocabulary), on random text with characters split over tokens;
and they agree with llguidance's view of the same vocabulary where llguidance can say."""

from __future__ import annotations

import random

import llguidance as llg
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from mcserve.server.model.default import default_model_dir
from mcserve.server.text.token_bytes import TokenBytes, display_token

ALPHABET = "ab eé日本語🎉\n\tñ€ÿ" + "".join(chr(c) for c in range(0x4E00, 0x4E08))


def _texts(seed: int, count: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def default_backend() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))


def _sentencepiece(decoder: str) -> tokenizers.Tokenizer:
    """A Llama-style vocabulary: byte tokens <0x00>..<0xFF>, a few pieces with the metaspace, byte
    fallback for everything else; decoded by `Replace` rules or by a `Metaspace` decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "b", "e", "日", "本", "▁a", "▁ab", "▁e", "日本", "é", "ñ"]:
        vocab[piece] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁a", "b"), ("▁", "e"), ("日", "本")],
                                          byte_fallback=True, unk_token="<unk>"))
    if decoder == "replace":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def test_byte_level_tokens_join_to_the_texts_bytes(default_backend: tokenizers.Tokenizer) -> None:
    tb = TokenBytes(default_backend)
    partial = 0
    for text in _texts(0):
        ids = default_backend.encode(text, add_special_tokens=False).ids
        assert b"".join(tb(i) for i in ids) == text.encode(), text
        partial += sum(1 for i in ids if display_token(tb(i)).startswith("bytes:\\x"))
    assert partial > 0, "some token holds part of a character"
    im_end = default_backend.token_to_id("<|im_end|>")
    assert tb(im_end) == b"<|im_end|>"


@pytest.mark.parametrize("decoder", ["replace", "metaspace"])
def test_sentencepiece_tokens_join_to_the_texts_bytes(decoder: str) -> None:
    tok = _sentencepiece(decoder)
    tb = TokenBytes(tok)
    fallback = 0
    for text in _texts(1):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 0 not in ids, "byte fallback: never <unk>"
        # the ▁ the tokenizer prepends (Metaspace does not when the text already starts with a space)
        start = "" if decoder == "metaspace" and text.startswith(" ") else " "
        assert b"".join(tb(i) for i in ids) == (start + text).encode(), text
        fallback += sum(1 for i in ids if 3 <= i < 259)
    assert fallback > 0
    assert tb(tok.token_to_id("<0xE6>")) == b"\xe6" and tb(tok.token_to_id("▁ab")) == b" ab"


def test_agrees_with_llguidance(default_backend: tokenizers.Tokenizer) -> None:
    """llguidance reads the same tokenizer.json for its token trie. It keeps byte 0xFF for its own
    special-token marker (that token decodes to b"" there), and reads no `Metaspace` decoder, so
    those are left out of the comparison."""
    for backend in (default_backend, _sentencepiece("replace")):
        tb, ll = TokenBytes(backend), llg.LLTokenizer(backend.to_str())
        size = backend.get_vocab_size(with_added_tokens=True)
        differ = [i for i in range(size) if tb(i) != ll.decode_bytes([i])]
        assert [tb(i) for i in differ] == [b"\xff"], [(i, backend.id_to_token(i)) for i in differ]
