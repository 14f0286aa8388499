"""Chat messages -> prompt text -> token ids, through the tokenizer's chat template.

The tokenizer (server/text/tokenizer.py) owns the template (Jinja2, sandboxed; a default when the model
ships none) and raises `ChatTemplateError` (a ValueError) when rendering fails. This module owns
what the template sees: plain dicts with string content, text parts joined by newlines, `developer`
mapped to `system` (templates written before that role know only `system`), and only text content
accepted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import jinja2

from mcserve.server.errors import InvalidRequestError, MCServeError


class ChatTokenizer(Protocol):
    vocab_size: int

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def _text_of(content: Any, where: str) -> str:
    """`content` is a string, None, or a list of parts with `.type` and `.text` (protocol.ContentPart)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"content part type {part.type!r} is not supported: this model reads text only"
                if part.type != "text"
                else "a text content part needs a 'text' string",
                param=f"{where}.content[{j}]",
            )
        texts.append(part.text)
    return "\n".join(texts)


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """protocol.ChatMessage objects -> the dicts a chat template iterates over."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.content is None and msg.role != "assistant":
            raise InvalidRequestError(f"a {msg.role} message needs content", param=f"{where}.content")
        item: dict[str, Any] = {
            "role": "system" if msg.role == "developer" else msg.role,
            "content": _text_of(msg.content, where),
        }
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_calls is not None:
            item["tool_calls"] = [_template_tool_call(c) for c in msg.tool_calls]
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


def _template_tool_call(call: Any) -> dict[str, Any]:
    """protocol.ToolCallIn -> a dict whose `arguments` is an object when the JSON text is one: what
    Hugging Face templates expect (ours takes either)."""
    arguments: Any = call.function.arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        arguments = parsed
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": arguments}}


def render_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text. A template that refuses the conversation (e.g. `raise_exception('roles must
    alternate')`) is the client's error: 400 with the template's message."""
    dicts = template_messages(messages)
    kwargs = {"tools": tools} if tools else {}  # templates that know tools render them; others ignore
    try:
        return tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, **kwargs)
    except MCServeError:
        raise
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from e


def chat_prompt_ids(
    tokenizer: ChatTokenizer,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the rendered conversation. The template writes any BOS itself, so encoding adds
    no special tokens (otherwise BOS would appear twice)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    return tokenizer.encode(text, add_special_tokens=False)
