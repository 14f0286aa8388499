"""server/text/chat.py against the real Tokenizer (server/text/tokenizer.py) and its default template."""

from __future__ import annotations

import pytest

from mcserve.server.api.protocol import ChatMessage
from mcserve.server.errors import InvalidRequestError
from mcserve.server.text.chat import chat_prompt_ids, render_chat, template_messages
from mcserve.server.text.tokenizer import Tokenizer
from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_byte_level_bpe(builtin_corpus(), 300), eos_token="<|endoftext|>")


def _msgs(*items: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def test_template_messages_flatten_parts_and_map_developer() -> None:
    out = template_messages(
        _msgs(
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": [1]}'}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        )
    )
    assert out == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [1]}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


def test_real_tokenizer_renders_and_encodes_without_extra_specials(tokenizer: Tokenizer) -> None:
    msgs = _msgs({"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"})
    text = render_chat(tokenizer, msgs)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nbe kind<|im_end|>" in text
    ids = chat_prompt_ids(tokenizer, msgs)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    no_gen = chat_prompt_ids(tokenizer, msgs, add_generation_prompt=False)
    assert len(no_gen) < len(ids)


def test_refused_content_and_template_errors_are_400(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError) as info:
        template_messages(_msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}))
    assert info.value.param == "messages[0].content[0]" and "'image_url'" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        template_messages(_msgs({"role": "system"}))
    assert info.value.param == "messages[0].content"
    broken = Tokenizer(tokenizer.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        render_chat(broken, _msgs({"role": "user", "content": "x"}))
    assert info.value.param == "messages"
