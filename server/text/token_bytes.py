"""The exact bytes of each token, whatever the tokenizer's decoder (byte-level BPE, Metaspace, byte
fallback): what OpenAI's logprob `bytes` report, and what text offsets are counted from.

Decoding one token as text loses this: a token holding part of a multi-byte UTF-8 character decodes
to U+FFFD alone. llguidance reads `tokenizer.json` and keeps each token's bytes (special tokens as
their text); its tokenizer is built on first use (about 1 s for a 150k vocabulary) and kept.
"""

from __future__ import annotations

import threading

import llguidance as llg


class TokenBytes:
    def __init__(self, tokenizer_json: str) -> None:
        self._json = tokenizer_json
        self._tok: llg.LLTokenizer | None = None
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            with self._lock:
                if self._tok is None:
                    self._tok = llg.LLTokenizer(self._json)
            b = self._cache[token_id] = self._tok.decode_bytes([token_id])
        return b


def display_token(b: bytes) -> str:
    """A token as text: its bytes when they are UTF-8, else OpenAI's `bytes:\\xe6\\x97` form (so two
    partial-character tokens never share a name)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)
