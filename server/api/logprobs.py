"""Logprobs as OpenAI reports them, from the tokens' exact bytes (`TokenBytes`).

A token that holds part of a UTF-8 character has its real bytes (never EF BF BD) and is named in
OpenAI's `bytes:\\xNN` form. `text_offset` (completions) is the index, in the choice's text, of the
character that holds the token's first byte, counted on the byte stream, so a character split over
three tokens gives all three its one offset, and offsets never pass the text's length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mcserve.server.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from mcserve.server.engine.outputs import TokenLogprob
from mcserve.server.text.token_bytes import display_token

TokenBytesFn = Callable[[int], bytes]


def _is_lead(byte: int) -> bool:
    return byte & 0xC0 != 0x80  # not a UTF-8 continuation byte


class TextOffsets:
    """Character offsets of a choice's tokens; `start`: characters before the first (an echoed prompt).
    Tokens in `skip` (special tokens that add no text) take the current offset and add nothing."""

    def __init__(self, start: int = 0, skip: Iterable[int] = ()) -> None:
        self.chars = start  # UTF-8 lead bytes seen = characters begun
        self._begun = start > 0
        self._skip = frozenset(skip)

    def add(self, token_id: int, b: bytes) -> int:
        if token_id in self._skip or not b:
            return self.chars
        offset = self.chars - 1 if self._begun and not _is_lead(b[0]) else self.chars
        self.chars += sum(_is_lead(x) for x in b)
        self._begun = True
        return offset


def chat_logprobs(items: tuple[TokenLogprob, ...] | None, token_bytes: TokenBytesFn) -> ChatLogprobs | None:
    if items is None:
        return None
    out = []
    for t in items:
        b = token_bytes(t.token_id)
        top = [TopLogprob(token=display_token(tb := token_bytes(i)), logprob=lp, bytes=list(tb)) for i, _, lp in t.top]
        out.append(ChatTokenLogprob(token=display_token(b), logprob=t.logprob, bytes=list(b), top_logprobs=top))
    return ChatLogprobs(content=out)


def completion_logprobs(items: Iterable[TokenLogprob], token_bytes: TokenBytesFn,
                        offsets: TextOffsets) -> CompletionLogprobs:
    """One entry per token; the sampled token is in its `top_logprobs`, as OpenAI reports it."""
    out = CompletionLogprobs()
    for t in items:
        b = token_bytes(t.token_id)
        out.tokens.append(display_token(b))
        out.token_logprobs.append(t.logprob)
        top = {display_token(token_bytes(i)): lp for i, _, lp in t.top}
        out.top_logprobs.append({**top, display_token(b): t.logprob})
        out.text_offset.append(offsets.add(t.token_id, b))
    return out


def vllm_prompt_logprobs(scored: tuple[TokenLogprob | None, ...], k: int, token_bytes: TokenBytesFn) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token its own entry and the `k` best alternatives, by id."""
    out: PromptLogprobs = []
    for t in scored:
        if t is None:
            out.append(None)
            continue
        entry = {str(i): PromptLogprob(logprob=lp, rank=r + 1, decoded_token=display_token(token_bytes(i)))
                 for r, (i, _, lp) in enumerate(t.top[:k])}
        entry[str(t.token_id)] = PromptLogprob(logprob=t.logprob, rank=t.rank,
                                               decoded_token=display_token(token_bytes(t.token_id)))
        out.append(entry)
    return out
