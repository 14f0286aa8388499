"""Counting and cutting text in tokens for `mcserve-bench`: the server's own tokenizer (`POST /tokenize`
and `/detokenize`, as mcserve and vLLM serve them), a local `tokenizer.json` (HF `tokenizers`), or
whitespace words for servers that have neither (then lengths are approximate)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

import httpx

from mcserve.clients.workload import random_words


class TokenizerError(RuntimeError):
    """The chosen tokenizer cannot be used (no /tokenize on the server, unreadable file)."""


class BenchTokenizer(Protocol):
    name: str

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...


class WordTokenizer:
    """One "token" per whitespace-separated word."""

    name = "words"

    def __init__(self) -> None:
        self._words: dict[str, int] = {}
        self._by_id: list[str] = []

    async def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self._words:
                self._words[w] = len(self._by_id)
                self._by_id.append(w)
            out.append(self._words[w])
        return out

    async def decode(self, ids: list[int]) -> str:
        return " ".join(self._by_id[i] for i in ids)


class LocalTokenizer:
    """A `tokenizer.json` file (or a directory holding one), without special tokens."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise TokenizerError(f"cannot read tokenizer {p}: {e}") from None
        self.name = f"file:{p}"

    async def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    async def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class ServerTokenizer:
    """The server's `/tokenize` and `/detokenize` (no special tokens)."""

    name = "server"

    def __init__(self, client: httpx.AsyncClient, model: str) -> None:
        self.client, self.model = client, model

    async def encode(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        r = await self.client.post("/tokenize", json=body)
        if r.status_code != 200:
            raise TokenizerError(f"POST /tokenize: {r.status_code} {r.text[:200]}")
        return list(r.json()["tokens"])

    async def decode(self, ids: list[int]) -> str:
        r = await self.client.post("/detokenize", json={"model": self.model, "tokens": ids})
        if r.status_code != 200:
            raise TokenizerError(f"POST /detokenize: {r.status_code} {r.text[:200]}")
        return str(r.json()["prompt"])


async def choose_tokenizer(spec: str, client: httpx.AsyncClient, model: str) -> BenchTokenizer:
    """`spec`: "server", "words", a tokenizer.json path, or "auto" (the server's if it answers
    /tokenize, else words)."""
    if spec == "words":
        return WordTokenizer()
    if spec not in ("server", "auto"):
        return LocalTokenizer(spec)
    tok = ServerTokenizer(client, model)
    try:
        await tok.encode("probe")
    except (TokenizerError, httpx.HTTPError, KeyError, ValueError) as e:
        if spec == "server":
            raise TokenizerError(f"the server cannot tokenize ({e}); use --tokenizer PATH or words") from None
        return WordTokenizer()
    return tok


async def text_of_tokens(tok: BenchTokenizer, rng: random.Random, n: int) -> str:
    """Random English words cut to exactly `n` tokens of `tok` (re-encoding the text may differ by a
    token where BPE merges across the cut; the server's `usage` reports the real count)."""
    words = max(4, int(n * 1.3) + 4)
    while True:
        ids = await tok.encode(random_words(rng, words))
        if len(ids) >= n:
            return await tok.decode(ids[:n])
        words *= 2


async def count_tokens(tok: BenchTokenizer, text: str) -> int:
    return len(await tok.encode(text))
