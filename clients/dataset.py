"""The conversations `mcserve-bench` sends: built from random text of given token lengths, or read
from a dataset file, then cycled through by the clients.

Dataset files:
- JSONL of prompts: one object per line, `{"prompt": "..."}` with an optional `"output_len"` (tokens);
  each line is a one-turn conversation.
- ShareGPT-style conversations: a JSON list (or JSONL) of `{"conversations": [{"from": "human" | "gpt"
  | "system", "value": "..."}, ...]}` (`"role"`/`"content"` and `"user"`/`"assistant"` work too). The
  human turns are sent in order, the history resent each turn; each turn's max_tokens is the length
  in tokens of the recorded reply (vLLM's rule), unless `--output-len` is given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mcserve.clients.tokens import BenchTokenizer, count_tokens, text_of_tokens
from mcserve.clients.workload import LoadConfig

_USER = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "model"}


@dataclass(frozen=True, slots=True)
class Turn:
    text: str
    max_tokens: int | None  # None: the run's --output-len


@dataclass(frozen=True, slots=True)
class Conversation:
    prefix: str  # the shared prefix (system message in chat, text before the prompt in completions)
    system: str  # the dataset's own system message, if any
    turns: tuple[Turn, ...]


def _load_json_items(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        items = json.loads(text)
    else:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ValueError(f"{path}: expected JSON objects (a list or one per line)")
    return items


def detect_format(items: list[dict]) -> str:
    return "sharegpt" if items and ("conversations" in items[0] or "messages" in items[0]) else "jsonl"


@dataclass(frozen=True, slots=True)
class _Raw:
    system: str
    users: tuple[str, ...]
    replies: tuple[str | None, ...]
    output_lens: tuple[int | None, ...]


def _parse(items: list[dict], fmt: str, path: Path) -> list[_Raw]:
    out = []
    for i, item in enumerate(items):
        if fmt == "jsonl":
            if not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise ValueError(f"{path}: line {i + 1} has no 'prompt' string")
            n = item.get("output_len")
            out.append(_Raw("", (item["prompt"],), (None,), (int(n) if n is not None else None,)))
            continue
        messages = item.get("conversations", item.get("messages")) or []
        system, users, replies = "", [], []
        for m in messages:
            role = str(m.get("from", m.get("role", ""))).lower()
            value = m.get("value", m.get("content"))
            if not isinstance(value, str):
                continue
            if role == "system" and not users:
                system = value
            elif role in _USER:
                users.append(value)
                replies.append(None)
            elif role in _ASSISTANT and users and replies[-1] is None:
                replies[-1] = value
        if users:
            out.append(_Raw(system, tuple(users), tuple(replies), (None,) * len(users)))
    if not out:
        raise ValueError(f"{path}: no usable conversation")
    return out


async def load_dataset(path: str | Path, fmt: str, tok: BenchTokenizer, cfg: LoadConfig) -> list[Conversation]:
    """Conversations of a dataset file; `fmt`: "auto", "jsonl" or "sharegpt". With `cfg.turns > 1` a
    conversation keeps at most that many turns (1: every conversation keeps all its turns)."""
    p = Path(path)
    items = _load_json_items(p)
    raws = _parse(items, detect_format(items) if fmt == "auto" else fmt, p)
    prefixes = await shared_prefixes(tok, cfg)
    out = []
    for k, raw in enumerate(raws):
        keep = len(raw.users) if cfg.turns == 1 else min(cfg.turns, len(raw.users))
        turns = []
        for t in range(keep):
            n = raw.output_lens[t]
            if n is None and raw.replies[t] is not None and not cfg.output_len_given:
                n = max(1, await count_tokens(tok, raw.replies[t]))
            turns.append(Turn(raw.users[t], n))
        out.append(Conversation(prefixes[k % len(prefixes)] if prefixes else "", raw.system, tuple(turns)))
    return out


async def shared_prefixes(tok: BenchTokenizer, cfg: LoadConfig) -> list[str]:
    """`cfg.num_prefixes` different prefixes of `cfg.shared_prefix_len` tokens (after `prefix_text`)."""
    rng = random.Random(f"{cfg.seed}-prefix")
    out = []
    for _ in range(cfg.num_prefixes):
        shared = await text_of_tokens(tok, rng, cfg.shared_prefix_len) if cfg.shared_prefix_len else ""
        out.append(" ".join(p for p in (cfg.prefix_text, shared) if p))
    return [p for p in out if p] or []


async def random_conversation(tok: BenchTokenizer, cfg: LoadConfig, k: int, prefixes: list[str]) -> Conversation:
    """Conversation `k`: `cfg.turns` turns of random text, `cfg.prompt_len` tokens per user message,
    shared prefix k mod num_prefixes. Built when a client starts it (seeded by k: runs repeat)."""
    rng = random.Random(f"{cfg.seed}-conversation-{k}")
    turns = []
    for _ in range(cfg.turns):
        text = await text_of_tokens(tok, rng, cfg.prompt_len.sample(rng))
        turns.append(Turn(text, cfg.output_len.sample(rng)))
    return Conversation(prefixes[k % len(prefixes)] if prefixes else "", "", tuple(turns))
