"""The exact bytes of each token: what OpenAI's logprob `bytes` report, and what text offsets are
counted from.

Decoding one token as text loses this: a token holding part of a multi-byte UTF-8 character decodes
to U+FFFD alone. The bytes are read from the token's vocabulary entry by the tokenizer's decoder
rules (`tokenizer.json`'s "decoder"), which are per-token maps for the families served here:
- byte-level BPE (a `ByteLevel` decoder): each character of the entry stands for one byte (GPT-2's
  alphabet, `tokenizers.pre_tokenizers.ByteLevel.alphabet`);
- SentencePiece style (`Metaspace`, or `Replace` + `ByteFallback`): `<0xNN>` entries are the byte NN,
  the metaspace `▁` is a space, the rest is the entry's UTF-8;
- anything else: the entry's UTF-8 (whole characters).
Added tokens (special or not) are their content's UTF-8. Sequence-level decoder steps (`Strip` of
the first space, `Fuse`) change no token's bytes, only how a whole text starts.
"""

from __future__ import annotations

import json
import re
from typing import Any

import tokenizers

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> character alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes, in order, for the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _decoder_steps(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [s for d in spec.get("decoders", []) for s in _decoder_steps(d)]
    return [spec]


class TokenBytes:
    """`token_bytes(id) -> bytes` for one `tokenizers.Tokenizer`, computed on first use and kept."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._backend = backend
        self._added = {i: t.content.encode() for i, t in backend.get_added_tokens_decoder().items()}
        steps = _decoder_steps(json.loads(backend.to_str()).get("decoder"))
        kinds = {s.get("type") for s in steps}
        self._byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds
        self._replace: list[tuple[str, str]] = [
            (s["pattern"]["String"], s["content"]) for s in steps
            if s.get("type") == "Replace" and "String" in s.get("pattern", {})
        ]
        self._replace += [(s.get("replacement", "▁"), " ") for s in steps if s.get("type") == "Metaspace"]
        self._cache: dict[int, bytes] = {}  # shared by threads: a racing miss computes the same bytes

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes_of(token_id)
        return b

    def _bytes_of(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id]
        entry = self._backend.id_to_token(token_id)
        if entry is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if self._byte_level is not None:
            table = self._byte_level
            if all(c in table for c in entry):
                return bytes(table[c] for c in entry)
            return entry.encode()  # an entry outside the alphabet cannot be produced by the model's BPE
        if self._byte_fallback and (m := _BYTE_TOKEN.fullmatch(entry)):
            return bytes([int(m.group(1), 16)])
        for old, new in self._replace:
            entry = entry.replace(old, new)
        return entry.encode()


def display_token(b: bytes) -> str:
    """A token as text: its bytes when they are UTF-8, else OpenAI's `bytes:\\xe6\\x97` form (so two
    partial-character tokens never share a name)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)
