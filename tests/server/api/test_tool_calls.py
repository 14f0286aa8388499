"""The Hermes tool-call parser on scripted outputs: every split of the text into stream pieces gives
the content and the calls of the whole text at once."""

from __future__ import annotations

import json
import random

import pytest

from mcserve.server.api.serving_chat import ChatChunkWriter
from mcserve.server.api.tool_calls import HermesToolParser
from mcserve.server.engine.outputs import Delta
from mcserve.server.text.tokenizer import Tokenizer
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe

CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "d": {"x": [1, 2]}, "s": "}\\"{"}}'
        "\n</tool_call>")
CASES = [
    # (text, content, [(name, arguments)])
    (CALL, "", [("get_weather", '{"city": "Paris", "d": {"x": [1, 2]}, "s": "}\\"{"}')]),
    ("Let me check.\n" + CALL + "\n<tool_call>{\"name\":\"add\",\"arguments\":{}}</tool_call>\n", "Let me check.",
     [("get_weather", '{"city": "Paris", "d": {"x": [1, 2]}, "s": "}\\"{"}'), ("add", "{}")]),
    ("plain text  \n with trailing space  ", "plain text  \n with trailing space  ", []),
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', "", [("f", '{"a": 1}')]),
    ("<tool_call>not json</tool_call> so", "<tool_call>not json</tool_call> so", []),
    ('<tool_call>{"name": "f", "arguments": {"a": 1', "", [("f", '{"a": 1')]),  # cut off by max_tokens
    ("a <tool_c", "a <tool_c", []),
    ("2 < 3 and <tool", "2 < 3 and <tool", []),
]


def _run(text: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feeds `pieces`; returns the content, the calls assembled from the deltas, and the calls' ids."""
    parser = HermesToolParser()
    content, calls, ids = "", {}, {}
    outs = [parser.feed(p) for p in pieces] + [parser.finish()]
    for text_out, deltas in outs:
        content += text_out
        for d in deltas:
            if d.id is not None:
                assert d.index not in ids and d.type == "function" and d.function.name
                ids[d.index] = d.id
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
    assert [c.id for c in parser.calls] == [ids[i] for i in sorted(ids)]
    assert [(c.function.name, c.function.arguments) for c in parser.calls] == [tuple(calls[i]) for i in sorted(calls)]
    return content, [tuple(calls[i]) for i in sorted(calls)], [ids[i] for i in sorted(ids)]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_any_split_gives_the_whole_texts_calls(text: str, content: str, calls: list) -> None:
    assert _run(text, [text])[:2] == (content, calls)
    rng = random.Random(len(text))
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _run(text, pieces)[:2] == (content, calls), pieces
    assert _run(text, list(text))[:2] == (content, calls)


def test_writer_streams_calls_from_detokenized_tokens() -> None:
    """Scripted tokens of a real byte-level BPE, detokenized one at a time as the engine does."""
    tok = Tokenizer(train_byte_level_bpe(builtin_corpus(), 300), eos_token="<|endoftext|>")
    text = "Sure.\n" + CALL
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    pieces[-1] += detok.flush()
    writer = ChatChunkWriter("chatcmpl-x", "m", 1, 3, False, tok.token_bytes, tool_calls=True)
    chunks = []
    for k, (t, piece) in enumerate(zip(ids, pieces, strict=True)):
        last = k == len(ids) - 1
        chunks += writer.on_delta(0, Delta("r", 0, (t,), piece, finish_reason="stop" if last else None))
    bodies = [json.loads(c.model_dump_json()) for c in chunks]
    content = "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)
    deltas = [d for b in bodies for d in b["choices"][0]["delta"].get("tool_calls") or []]
    assert content == "Sure."
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {
        "city": "Paris", "d": {"x": [1, 2]}, "s": '}"{'}
    assert len(deltas) > 3, "arguments are streamed in pieces, not at the end"
    assert bodies[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_parser_is_chosen_by_setting_then_tokenizer_config(tmp_path) -> None:
    from mcserve.server.api.serving import ServingContext
    from mcserve.server.errors import ConfigError
    from mcserve.server.metrics import EngineMetrics
    from mcserve.server.settings import ApiSettings
    from mcserve.server.text.tokenizer_train import write_tokenizer_files

    write_tokenizer_files(tmp_path, train_byte_level_bpe(builtin_corpus(), 300))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tool_call_parser": "none"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.tool_call_parser == "none"

    def parser(settings: ApiSettings, tokenizer: object) -> str:
        return ServingContext(None, tokenizer, settings, EngineMetrics("m")).tool_call_parser  # type: ignore[arg-type]

    assert parser(ApiSettings(), tok) == "none"
    assert parser(ApiSettings(tool_call_parser="hermes"), tok) == "hermes"
    assert parser(ApiSettings(), Tokenizer(tok.backend)) == "hermes"
    with pytest.raises(ConfigError, match="tool_call_parser"):
        ApiSettings(tool_call_parser="xml")
