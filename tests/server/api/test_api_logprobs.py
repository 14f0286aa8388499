"""Exact logprobs through the `openai` client, on the tiny model's byte-level BPE: real bytes for
tokens that hold part of a character, offsets counted on the byte stream, the sampled token in
`top_logprobs`, echo + logprobs and vLLM's prompt_logprobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.api.tiny_live import MODEL, client, tiny_server

WORDS = ["日本語です", "héllo wörld", "naïve café ☕"]


def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (printable bytes stand for themselves, the others are shifted past
    255): an oracle for token bytes independent of the server's code."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lp") / "model"


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Iterator[str]:
    with tiny_server(model_dir) as url:
        yield url


def _token_bytes(model_dir: Path, text: str) -> list[tuple[int, bytes]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    dec = _gpt2_byte_decoder()
    return [(i, bytes(dec[c] for c in tok.id_to_token(i))) for i in tok.encode(text, add_special_tokens=False).ids]


def _char_of_byte(text: str) -> list[int]:
    """For each byte of text's UTF-8, the index of the character holding it."""
    return [i for i, ch in enumerate(text) for _ in ch.encode()]


def test_chat_logprob_bytes_are_the_real_bytes(base: str) -> None:
    r = client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "say it"}],
                                             max_tokens=40, logprobs=True, top_logprobs=3, temperature=0,
                                             extra_body={"guided_choice": WORDS})
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    assert text in WORDS
    assert b"".join(bytes(t.bytes) for t in content) == text.encode()
    partial = [t for t in content if not _valid(bytes(t.bytes))]
    assert partial, "some token holds part of a character (the tiny vocab splits them)"
    assert all(t.token.startswith("bytes:\\x") and "\ufffd" not in t.token for t in partial)
    assert all(bytes(t.bytes) != "\ufffd".encode() for t in content)
    for t in content:
        assert all(a.bytes is not None and a.token == _display(bytes(a.bytes)) for a in t.top_logprobs)


def _valid(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def _display(b: bytes) -> str:
    return b.decode() if _valid(b) else "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def test_completion_offsets_count_characters_and_top_has_the_sampled_token(base: str) -> None:
    r = client(base).completions.create(model=MODEL, prompt="Answer:", max_tokens=40, logprobs=2, temperature=0.7,
                                        seed=11, extra_body={"guided_choice": WORDS})
    choice = r.choices[0]
    text, lp = choice.text, choice.logprobs
    assert text in WORDS
    raw = b"".join(b"" if t.startswith("bytes:") else t.encode() for t in lp.tokens)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) and raw
    of_byte, pos = _char_of_byte(text), 0
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        b = _bytes_of(token)
        assert offset == of_byte[pos], (token, offset, pos)
        pos += len(b)
    assert pos == len(text.encode()) and max(lp.text_offset) < len(text)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == chosen and len(top) in (2, 3)


def _bytes_of(token: str) -> bytes:
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def test_echo_with_logprobs_scores_the_prompt(base: str, model_dir: Path) -> None:
    prompt = "Grüße aus 東京"
    r = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=2, echo=True,
                                        temperature=0, extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    choice = r.choices[0]
    lp = choice.logprobs
    expect = _token_bytes(model_dir, prompt)
    n = len(expect)
    assert choice.text.startswith(prompt) and len(lp.tokens) == n + 3
    assert [_bytes_of(t) for t in lp.tokens[:n]] == [b for _, b in expect]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    of_byte, pos = _char_of_byte(prompt), 0
    for offset, (_, b) in zip(lp.text_offset[:n], expect, strict=True):
        assert offset == of_byte[pos]
        pos += len(b)
    assert lp.text_offset[n] == len(prompt)  # the first generated token starts after the echo
    # vLLM's prompt_logprobs: the same numbers, keyed by token id, with the token itself in each entry
    plp = choice.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == n
    for pos in range(1, n):
        tid, _ = expect[pos]
        entry = plp[pos][str(tid)]
        assert entry["logprob"] == pytest.approx(lp.token_logprobs[pos]) and entry["rank"] >= 1
    assert json.dumps(plp)


def test_chat_prompt_logprobs_streamed_and_not(base: str) -> None:
    """vLLM's chat `prompt_logprobs`: top-level, one list for the templated prompt, the same numbers
    streamed (once, on the first chunk with a token) as in one body and as /v1/completions gives
    for the same ids."""
    import httpx

    messages = [{"role": "user", "content": "Grüße, 東京!"}]
    ids = httpx.post(base + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    c = client(base)
    kw = dict(model=MODEL, messages=messages, max_tokens=2, temperature=0, n=2, extra_body={"prompt_logprobs": 2})
    plp = c.chat.completions.create(**kw).model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert str(ids[pos]) in entry and 2 <= len(entry) <= 3
        assert all(e["logprob"] <= 0 and e["rank"] >= 1 for e in entry.values())
    chunks = list(c.chat.completions.create(stream=True, **kw))
    streamed = [ch.model_extra["prompt_logprobs"] for ch in chunks if ch.model_extra.get("prompt_logprobs")]
    assert len(streamed) == 1 and _close(streamed[0], plp)
    assert all("prompt_logprobs" not in ch.model_extra for ch in chunks if not ch.model_extra.get("prompt_logprobs"))
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
    assert _close(r.choices[0].model_extra["prompt_logprobs"], plp)
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert "prompt_logprobs" not in plain.model_extra


def _close(a: list, b: list) -> bool:
    """The same entries, logprobs equal to float tolerance (batches of different shape round differently)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and (x.keys() != y.keys() or any(
                x[t]["rank"] != y[t]["rank"] or abs(x[t]["logprob"] - y[t]["logprob"]) > 1e-4 for t in x)):
            return False
    return True
