"""Limits on what one request may ask for, checked on the parsed body before templating, tokenizing or
the engine see it; each violation is an OpenAI-style 400 naming the field and the limit.

The body's size (8 MiB) and the headers' (8 KiB) are bounded by the middleware before this; what is
left here is what a body under that size can still make expensive: thousands of messages, stop
strings or stop ids checked on every token, a logit bias over the whole vocabulary, many choices.

Prompt text is bounded by `check_prompt_bytes`, the sound cheap check: with a tokenizer whose every
token covers between 1 and L input bytes (`Tokenizer.max_token_bytes`), a text of b bytes has at
least ceil(b / L) tokens, so b > (max_model_len - 1) * L can never fit (one position is needed for
the output) and is refused before tokenizing. The reverse check, "b < max_model_len so it fits",
would be wrong: a token is at least 1 byte, so b bytes may be anything from ceil(b / L) to b tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mcserve.server.api.protocol import MAX_PROMPTS
from mcserve.server.errors import ContextLengthError, InvalidRequestError, check_context_length

MAX_MESSAGES = 2048
MAX_N = 128  # choices per prompt (OpenAI's bound)
MAX_STOP = 16  # stop strings; each is matched against the text of every new token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries; applied to the logits on every step
MAX_NAME_CHARS = 256  # identifier-like strings: model, messages[].name, tool_call_id, user


def _count(value: Sequence | dict | None, limit: int, param: str, what: str) -> None:
    if value is not None and len(value) > limit:
        raise InvalidRequestError(
            f"{param}: at most {limit} {what}, got {len(value)}", param=param, code="limit_exceeded"
        )


def _chars(value: str | None, limit: int, param: str) -> None:
    if value is not None and len(value) > limit:
        raise InvalidRequestError(
            f"{param}: at most {limit} characters, got {len(value)}", param=param, code="limit_exceeded"
        )


def check_raw_body(obj: object, max_model_len: int) -> None:
    """The counts of a body parsed by the standard library, before pydantic builds models from it:
    validating 100k messages or a million stop ids takes seconds, holding the GIL. Only lists and
    objects whose size is bounded are looked at; their types are pydantic's to check."""
    if not isinstance(obj, dict):
        return
    for name, limit, what in (
        ("messages", MAX_MESSAGES, "messages"),
        ("stop", MAX_STOP, "stop strings"),
        ("stop_token_ids", MAX_STOP_TOKEN_IDS, "token ids"),
        ("logit_bias", MAX_LOGIT_BIAS, "entries"),
    ):
        value = obj.get(name)
        if isinstance(value, (list, dict)):
            _count(value, limit, name, what)
    if isinstance(obj.get("tokens"), list):  # /detokenize
        _count(obj["tokens"], max_model_len, "tokens", "token ids (max_model_len)")
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # several prompts
        _count(prompt, MAX_PROMPTS, "prompt", "prompts per request")
    if isinstance(prompt, list):
        nested = [prompt] if not prompt or not isinstance(prompt[0], list) else prompt
        for k, ids in enumerate(nested):
            if isinstance(ids, list) and not (ids and isinstance(ids[0], str)):
                param = "prompt" if nested is not prompt else f"prompt[{k}]"
                check_context_length(len(ids), max_model_len, param=param)


def check_sampling_limits(body: Any) -> None:
    """The fields every generation endpoint shares (protocol._SamplingRequest)."""
    _chars(body.model, MAX_NAME_CHARS, "model")
    _chars(body.user, MAX_NAME_CHARS, "user")
    if body.n is not None and body.n > MAX_N:
        raise InvalidRequestError(f"n: at most {MAX_N} choices, got {body.n}", param="n", code="limit_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    _count(stop, MAX_STOP, "stop", "stop strings")
    for i, s in enumerate(stop or ()):
        _chars(s, MAX_STOP_CHARS, "stop" if isinstance(body.stop, str) else f"stop[{i}]")
    _count(body.stop_token_ids, MAX_STOP_TOKEN_IDS, "stop_token_ids", "token ids")
    _count(body.logit_bias, MAX_LOGIT_BIAS, "logit_bias", "entries")


def check_messages(messages: Sequence[Any] | None) -> None:
    """Count and identifiers of chat messages; their content is bounded by the rendered prompt."""
    _count(messages, MAX_MESSAGES, "messages", "messages")
    for i, m in enumerate(messages or ()):
        _chars(m.name, MAX_NAME_CHARS, f"messages[{i}].name")
        _chars(m.tool_call_id, MAX_NAME_CHARS, f"messages[{i}].tool_call_id")
        if isinstance(m.content, list):
            _count(m.content, MAX_MESSAGES, f"messages[{i}].content", "content parts")


def prompt_byte_bound(max_model_len: int, max_token_bytes: int | None) -> int | None:
    """The most UTF-8 bytes a prompt can have and still fit (None: no sound bound is known)."""
    return None if max_token_bytes is None else (max_model_len - 1) * max_token_bytes


def check_prompt_bytes(text: str, max_model_len: int, max_token_bytes: int | None, param: str) -> None:
    """ContextLengthError when `text` cannot fit in any tokenization (see the module docstring).
    Counts the bytes only when the character count cannot decide (1 to 4 bytes per character)."""
    bound = prompt_byte_bound(max_model_len, max_token_bytes)
    if bound is None or 4 * len(text) <= bound:
        return
    size = len(text) if len(text) > bound else len(text.encode("utf-8", "surrogatepass"))
    if size > bound:
        at_least = -(-size // max_token_bytes)  # type: ignore[operator]
        raise ContextLengthError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has at least "
            f"{at_least} tokens: it has at least {size} bytes and no token of this tokenizer covers more than "
            f"{max_token_bytes} bytes; shorten the prompt",
            param=param,
        )
