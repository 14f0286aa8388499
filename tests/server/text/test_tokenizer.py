from __future__ import annotations

import json
import random
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from mcserve.server.text.detokenizer import CONTEXT_TOKENS, CUT_SEARCH, MAX_PENDING, IncrementalDetokenizer
from mcserve.server.text.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    TokenizerLoadError,
)
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe, write_tokenizer_files

MULTIBYTE = [
    "日本語のテキストです。東京は大きい。",
    "Party time 🎉🙂👍🏽 and a family 👨‍👩‍👧!",
    "Crème brûlée at the café, naïve façade — “quoted” €12.50 ñ ø å",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(root, train_byte_level_bpe(builtin_corpus(), 500))
    return root


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def _copy_with_config(tok_dir: Path, dest: Path, **config: object) -> Path:
    shutil.copy(tok_dir / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


def test_training_is_deterministic_and_sized() -> None:
    a = train_byte_level_bpe(builtin_corpus(), 400)
    b = train_byte_level_bpe(builtin_corpus(), 400)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400
    assert [a.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


def test_train_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="got 100"):
        train_byte_level_bpe(["hello"], 100)


def test_builtin_corpus_is_varied_text() -> None:
    corpus = builtin_corpus()
    text = "\n".join(corpus)
    assert len(corpus) > 100
    assert 40_000 < len(text.encode()) < 100_000
    for needle in ("café", "naïve", "“", "—", "€", "日本語"):
        assert needle in text


def test_special_ids(tok: Tokenizer) -> None:
    eos, im_start, im_end = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert tok.vocab_size == 500
    assert tok.eos_token_id == eos
    assert tok.eos_token_ids == {eos, im_end}
    assert tok.bos_token_id is None
    assert tok.pad_token_id == eos
    assert tok.all_special_ids == {eos, im_start, im_end}
    assert tok.id_to_token(im_end) == "<|im_end|>"


@pytest.mark.parametrize("text", ["", "Hello, world!", "  two  spaces\n\ttab", *MULTIBYTE])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_token_strings_encode_to_their_ids(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_decode_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 500 is out of range for vocab size 500"):
        tok.decode([1, 500])


def test_add_bos_token(tok_dir: Path, tmp_path: Path) -> None:
    t = Tokenizer.from_dir(
        _copy_with_config(tok_dir, tmp_path, bos_token={"content": "<|im_start|>"}, add_bos_token=True)
    )
    bos = t.token_to_id("<|im_start|>")
    assert t.bos_token_id == bos
    assert t.encode("hi") == [bos, *t.encode("hi", add_special_tokens=False)]
    assert t.encode("<|im_start|>hi").count(bos) == 1


def test_default_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
    )


def test_content_must_be_flattened_first(tok: Tokenizer) -> None:
    # Content parts are flattened in one place, server/text/chat.py (tests/server/api/test_api_chat_prompt.py).
    content = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.content must be a string or None, got list"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": content}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.role must be a string"):
        tok.apply_chat_template([{"content": "x"}])
    assert tok.apply_chat_template([{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )


def test_custom_template_from_config(tok_dir: Path, tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
        "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ suffix }}"
    )
    t = Tokenizer.from_dir(_copy_with_config(tok_dir, tmp_path, chat_template=template, bos_token="<|im_start|>"))
    tools = [{"name": "f", "description": "<a & b>"}]
    out = t.apply_chat_template([{"role": "user", "content": "héllo"}], tools=tools, suffix="!")
    assert out == '<|im_start|>[USER] héllo\nTOOLS=[{"name": "f", "description": "<a & b>"}]\n[ASSISTANT]!'
    # The custom template does not use <|im_end|>, so only eos stops generation.
    assert t.eos_token_ids == {t.token_to_id("<|endoftext|>")}


def test_named_template_list_uses_default(tok_dir: Path, tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "PLAIN"}]
    t = Tokenizer.from_dir(_copy_with_config(tok_dir, tmp_path, chat_template=templates))
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "PLAIN"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "f"}]) == "TOOLS"


def test_raise_exception_in_template(tok_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    )
    t = Tokenizer.from_dir(_copy_with_config(tok_dir, tmp_path, chat_template=template))
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_syntax_error_is_a_load_error(tok_dir: Path, tmp_path: Path) -> None:
    _copy_with_config(tok_dir, tmp_path, chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerLoadError, match="tokenizer_config.json: field 'chat_template'"):
        Tokenizer.from_dir(tmp_path)


def test_missing_config_uses_defaults(tok_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token_id == t.token_to_id("<|endoftext|>")
    assert t.bos_token_id is None
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_from_chat_template_jinja(tok_dir: Path, tmp_path: Path) -> None:
    _copy_with_config(tok_dir, tmp_path, eos_token="<|endoftext|>")
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }} messages", encoding="utf-8")
    t = Tokenizer.from_dir(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "a"}] * 3) == "3 messages"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_dir(tmp_path)


def test_bad_json(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ', encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_eos_not_in_vocab(tok_dir: Path, tmp_path: Path) -> None:
    _copy_with_config(tok_dir, tmp_path, eos_token="</s>")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json: field 'eos_token': '</s>' is not in"):
        Tokenizer.from_dir(tmp_path)


def test_bad_field_types(tok_dir: Path, tmp_path: Path) -> None:
    _copy_with_config(tok_dir, tmp_path, add_bos_token="yes")
    with pytest.raises(TokenizerLoadError, match="field 'add_bos_token': must be true or false, got 'yes'"):
        Tokenizer.from_dir(tmp_path)
    _copy_with_config(tok_dir, tmp_path, bos_token=5)
    with pytest.raises(TokenizerLoadError, match="field 'bos_token'.*got 5"):
        Tokenizer.from_dir(tmp_path)


def _stream(tok: Tokenizer, ids: list[int], chunks: list[int] | None = None, **kw: object) -> tuple[list[str], str]:
    detok = tok.detokenizer(**kw)
    pieces, i = [], 0
    for size in chunks or [1] * len(ids):
        pieces.append(detok.push(ids[i : i + size]))
        i += size
    assert i == len(ids)
    return pieces, detok.flush()


@pytest.mark.parametrize("text", MULTIBYTE, ids=["japanese", "emoji", "accented"])
def test_detokenizer_token_by_token_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # Precondition: this text really has tokens that end inside a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_random_chunks(tok: Tokenizer) -> None:
    text = " ".join(MULTIBYTE) + " plain English to finish."
    ids = tok.encode(text)
    rng = random.Random(0)
    for _ in range(20):
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(1, 5)))
            left -= chunks[-1]
        pieces, rest = _stream(tok, ids, chunks)
        assert "".join(pieces) + rest == text
        assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_decodes_a_bounded_window() -> None:
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return "".join(chr(0x41 + i % 26) for i in ids)

    detok = IncrementalDetokenizer(decode, prompt_ids=list(range(1000)))
    out = "".join(detok.push(i) for i in range(3000))
    assert out == "".join(chr(0x41 + i % 26) for i in range(3000))
    # Each step decodes the context plus the new token, never the sequence so far.
    assert max(seen) <= CONTEXT_TOKENS + 1


def test_detokenizer_emits_invalid_bytes_eventually(tok: Tokenizer) -> None:
    # A lead byte repeated forever never forms a character: output must not stall indefinitely.
    lead = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd" and tok.decode([i, i]) == "\ufffd" * 2)
    detok = tok.detokenizer()
    pieces = [detok.push(lead) for _ in range(100)]
    assert "".join(pieces) + detok.flush() == tok.decode([lead] * 100)
    assert sum(len(p) for p in pieces) >= 100 - (MAX_PENDING + CUT_SEARCH)


def test_detokenizer_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("The weather was")
    gen = tok.encode(" cold and bright.")
    detok = tok.detokenizer(prompt_ids=prompt)
    assert "".join(detok.push(i) for i in gen) + detok.flush() == " cold and bright."


def test_detokenizer_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(_stream(tok, ids)[0]) == "hi"
    pieces, rest = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) + rest == "hi<|im_end|>"


def _token_boundaries(tok: Tokenizer, ids: list[int]) -> list[int]:
    return [len(tok.decode(ids[:k])) for k in range(len(ids) + 1)]


def _spans_tokens(tok: Tokenizer, ids: list[int], text: str, stop: str) -> int:
    """How many tokens the first occurrence of `stop` in `text` touches."""
    start = text.index(stop)
    bounds = _token_boundaries(tok, ids)
    return sum(1 for a, b in pairwise(bounds) if a < start + len(stop) and b > start)


@pytest.mark.parametrize(
    ("text", "stop", "before"),
    [
        ("They walked home. The end of it all came later.", "The end", "They walked home. "),
        ("Tea costs €2.40 today, coffee more.", "€2.40", "Tea costs "),
        ("東京は大きい。日本語です。", "日本語", "東京は大きい。"),
    ],
)
def test_stop_string_across_tokens(tok: Tokenizer, text: str, stop: str, before: str) -> None:
    ids = tok.encode(text)
    assert _spans_tokens(tok, ids, text, stop) >= 2
    detok = tok.detokenizer(stop=["never appears", stop])
    out = ""
    for i in ids:
        out += detok.push(i)
        if detok.stopped:
            break
    assert out == before
    assert detok.stopped and detok.stop_reason == stop
    assert detok.push(ids[-1]) == "" and detok.flush() == ""


def test_stop_string_at_start(tok: Tokenizer) -> None:
    ids = tok.encode("Hello there")
    detok = tok.detokenizer(stop=["Hel"])
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == ""
    assert detok.stop_reason == "Hel"


def test_partial_stop_is_held_then_released(tok: Tokenizer) -> None:
    text = "a STOP. b STOP!"
    ids = tok.encode(text)
    detok = tok.detokenizer(stop=["STOP!"])
    emitted, held_checks = "", 0
    for k, i in enumerate(ids):
        emitted += detok.push(i)
        seen = tok.decode(ids[: k + 1])
        if seen.endswith(("S", "ST", "STO", "STOP")) and not detok.stopped:
            assert emitted == seen[: seen.rindex("S")]
            held_checks += 1
    assert held_checks >= 2
    assert emitted == "a STOP. b "
    assert detok.stop_reason == "STOP!"


def test_flush_releases_held_partial_stop(tok: Tokenizer) -> None:
    ids = tok.encode("almost the en")
    detok = tok.detokenizer(stop=["the end"])
    emitted = "".join(detok.push(i) for i in ids)
    assert emitted == "almost "
    assert detok.flush() == "the en"
    assert not detok.stopped and detok.stop_reason is None


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    text = "one, two, three, four"
    ids = tok.encode(text)
    assert _spans_tokens(tok, ids, text, "three") >= 2
    detok = tok.detokenizer(stop=["three"], include_stop_str_in_output=True)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == "one, two, three"
    assert detok.stop_reason == "three"


def test_earliest_completed_stop_wins() -> None:
    def chars(text: str) -> list[int]:
        return [ord(ch) for ch in text]

    detok = IncrementalDetokenizer(lambda ids: "".join(map(chr, ids)), stop=["abcd", "bc"])
    assert detok.push(chars("xxabcd")) == "xxa"
    assert detok.stop_reason == "bc"
    # Same end: the longer one (it started earlier).
    detok = IncrementalDetokenizer(lambda ids: "".join(map(chr, ids)), stop=["c", "abc"])
    assert detok.push(chars("xxabcd")) == "xx"
    assert detok.stop_reason == "abc"


def test_multi_token_push_cuts_text_after_stop() -> None:
    detok = IncrementalDetokenizer(lambda ids: "".join(map(chr, ids)), stop=["##"])
    assert detok.push([ord(ch) for ch in "ab#"]) == "ab"
    assert detok.push([ord(ch) for ch in "#cd"]) == ""
    assert detok.stopped


def test_empty_stop_string_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="got ''"):
        tok.detokenizer(stop=["ok", ""])


def test_stops_do_not_count_before_min_tokens(tok: Tokenizer) -> None:
    """check_stop=False (before min_tokens): a stop string in that text is emitted, not matched, and a
    held-back partial match is released; checking resumes afterwards."""
    ids = tok.encode("a STOP b STOP c")
    first_stop_end = next(k for k in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:k]))
    detok = tok.detokenizer(stop=["STOP"])
    out = "".join(detok.push(i, check_stop=k >= first_stop_end) for k, i in enumerate(ids))
    assert detok.stopped and detok.stop_reason == "STOP"
    assert out == "a STOP b "
    plain = tok.detokenizer(stop=["STOP"])
    assert "".join(plain.push(i) for i in ids) == "a "
