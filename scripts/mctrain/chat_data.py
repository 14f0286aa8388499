"""Chat conversations as training tokens: rendered with the served chat template, scored on the
assistant's turns only; cached as uint16 ids + a bit-packed mask; sampled as random windows.

A data folder (made by scripts/build_chat_data.py) holds, besides token_data's text arrays,
    chat_train.npy, chat_heldout.npy            uint16 ids, conversations back to back, each ending
                                                 in <|endoftext|>, shuffled across sources
    chat_train_mask.npy, chat_heldout_mask.npy   np.packbits of 1 where the token is scored: the
                                                 content of an assistant message and its <|im_end|>
    chat_meta.json                               lengths, per-source counts, the tokenizer's sha256
    chat_heldout.jsonl                           the held-out conversations as text (so that a model
                                                 with another tokenizer can be scored on them)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mctrain.corpus import EOT
from mctrain.token_data import TOKENIZER_DIR, _sha

ASSISTANT = "assistant"
CHAT_META = "chat_meta.json"


def render(template, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the server renders it (`template`: server.text.tokenizer.Tokenizer's chat
    template), and the character spans [start, end) that are scored: each assistant message's
    content and the <|im_end|> after it. Found by rendering message prefixes, so they follow any
    template that renders a prefix of the messages as a prefix of the text."""
    spans, prev = [], ""
    for i, m in enumerate(messages):
        text = template(messages[:i + 1])
        assert text.startswith(prev), "the chat template must render message prefixes as text prefixes"
        if m["role"] == ASSISTANT:
            start = text.index(m["content"], len(prev)) if m["content"] else len(text)
            end = text.index("<|im_end|>", start) + len("<|im_end|>")
            spans.append((start, end))
        prev = text
    return prev, spans


def scored_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """offsets [T, 2] character spans of the tokens -> [T] bool, True for a non-empty token inside a
    scored span (spans sorted and disjoint)."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts = np.array([a for a, _ in spans])
    ends = np.array([b for _, b in spans])
    j = np.searchsorted(starts, offsets[:, 0], side="right") - 1  # the last span starting at or before the token
    inside = (j >= 0) & (offsets[:, 1] <= ends[np.maximum(j, 0)])
    return inside & (offsets[:, 1] > offsets[:, 0])


def encode_all(backend, template, conversations: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """ids [N] uint16 and mask [N] bool of the conversations back to back, each followed by an
    unscored <|endoftext|>. `backend` is a tokenizers.Tokenizer, `template` messages -> text."""
    rendered = [render(template, c) for c in conversations]
    eot = backend.token_to_id(EOT)
    ids, masks = [], []
    for enc, (_, spans) in zip(backend.encode_batch([t for t, _ in rendered], add_special_tokens=False),
                               rendered, strict=True):
        ids.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
        masks.append(np.append(scored_mask(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans), False))
    if not ids:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=bool)
    return np.concatenate(ids), np.concatenate(masks)


def write(root: str | Path, backend, template, train: list[list[dict]], heldout: list[list[dict]],
          counts: dict) -> dict:
    root = Path(root)
    meta: dict = dict(sources=counts, tokenizer_sha256=_sha(root / TOKENIZER_DIR / "tokenizer.json"))
    for split, convs in (("train", train), ("heldout", heldout)):
        ids, mask = encode_all(backend, template, convs)
        np.save(root / f"chat_{split}.npy", ids)
        np.save(root / f"chat_{split}_mask.npy", np.packbits(mask))
        meta[split] = dict(tokens=int(len(ids)), scored=int(mask.sum()), conversations=len(convs))
    with (root / "chat_heldout.jsonl").open("w", encoding="utf-8") as f:
        for c in heldout:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    (root / CHAT_META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@dataclass(frozen=True)
class ChatData:
    ids: np.ndarray  # [N] uint16
    mask: np.ndarray  # [N] bool
    held_ids: np.ndarray
    held_mask: np.ndarray

    @classmethod
    def load(cls, data_dir: str | Path) -> ChatData:
        root = Path(data_dir)
        if not (root / CHAT_META).is_file():
            raise FileNotFoundError(f"{root / CHAT_META} missing: build the chat data with scripts/build_chat_data.py")
        meta = json.loads((root / CHAT_META).read_text())
        if _sha(root / TOKENIZER_DIR / "tokenizer.json") != meta["tokenizer_sha256"]:
            raise ValueError(f"{root / CHAT_META} was built with another tokenizer; rebuild the chat data")

        def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
            ids = np.load(root / f"chat_{split}.npy")
            mask = np.unpackbits(np.load(root / f"chat_{split}_mask.npy"), count=len(ids)).astype(bool)
            return ids, mask

        return cls(*arrays("train"), *arrays("heldout"))

    def sample_windows(self, rng: np.random.Generator, batch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [batch, window] int64 and the mask of each id [batch, window] float32, random windows."""
        if len(self.ids) <= window:
            raise ValueError(f"chat data has {len(self.ids)} tokens, fewer than a window of {window}")
        starts = (rng.random(batch) * (len(self.ids) - window)).astype(np.int64)
        idx = starts[:, None] + np.arange(window)[None, :]
        return self.ids[idx].astype(np.int64), self.mask[idx].astype(np.float32)

    def heldout_windows(self, window: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Non-overlapping held-out windows (ids, mask) of `window` tokens, the tail dropped."""
        n = len(self.held_ids) // window
        return [(self.held_ids[i * window:(i + 1) * window].astype(np.int64),
                 self.held_mask[i * window:(i + 1) * window]) for i in range(n)]
