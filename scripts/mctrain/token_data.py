"""Tokenised training data: built once from a corpus, cached as uint16 .npy, sampled as random windows.

A data folder holds
    tokenizer/         tokenizer.json + tokenizer_config.json (scripts/train_tokenizer.py)
    train.npy          uint16 token ids of every source's training part, sources back to back
    heldout.npy        uint16 token ids of every source's held-out part
    meta.json          per source: name, weight, [offset, length) in each array; the tokenizer's sha256
It is all the GPU run needs (the corpus itself never travels).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mctrain.corpus import Source, text_blocks

TOKENIZER_DIR, TRAIN_FILE, HELDOUT_FILE, META_FILE = "tokenizer", "train.npy", "heldout.npy", "meta.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _encode(tok, text: str) -> np.ndarray:
    ids = [i for enc in tok.encode_batch(text_blocks(text)) for i in enc.ids]
    return np.asarray(ids, dtype=np.uint16)


def build_token_data(sources: list[Source], data_dir: str | Path) -> dict:
    """Tokenise `sources` with `data_dir/tokenizer` and write the arrays and meta.json. Returns meta."""
    import tokenizers

    root = Path(data_dir)
    tok_file = root / TOKENIZER_DIR / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    if tok.get_vocab_size() > 1 << 16:
        raise ValueError(f"vocab size {tok.get_vocab_size()} does not fit uint16")
    train_parts, held_parts, entries = [], [], []
    t_off = h_off = 0
    for src in sources:
        tr, he = _encode(tok, src.train_text), _encode(tok, src.heldout_text)
        entries.append(dict(name=src.name, weight=src.weight, train=[t_off, len(tr)], heldout=[h_off, len(he)],
                            heldout_bytes=len(src.heldout_text.encode("utf-8"))))
        train_parts.append(tr)
        held_parts.append(he)
        t_off += len(tr)
        h_off += len(he)
    np.save(root / TRAIN_FILE, np.concatenate(train_parts))
    np.save(root / HELDOUT_FILE, np.concatenate(held_parts))
    meta = dict(sources=entries, vocab_size=tok.get_vocab_size(), tokenizer_sha256=_sha(tok_file))
    (root / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@dataclass(frozen=True)
class TokenData:
    """The arrays of a data folder, with per-source sampling probabilities for training windows."""

    root: Path
    train: np.ndarray  # [N] uint16
    heldout: np.ndarray  # [M] uint16
    sources: list[dict]
    vocab_size: int

    @classmethod
    def load(cls, data_dir: str | Path) -> TokenData:
        root = Path(data_dir)
        for name in (TRAIN_FILE, HELDOUT_FILE, META_FILE, f"{TOKENIZER_DIR}/tokenizer.json"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} missing: build the data folder first (scripts/"
                                        "train_tokenizer.py, then scripts/train.py --corpus ... --prepare-only)")
        meta = json.loads((root / META_FILE).read_text())
        sha = _sha(root / TOKENIZER_DIR / "tokenizer.json")
        if sha != meta["tokenizer_sha256"]:
            raise ValueError(f"{root / META_FILE} was built with another tokenizer; delete the .npy files and rebuild")
        return cls(root, np.load(root / TRAIN_FILE), np.load(root / HELDOUT_FILE), meta["sources"],
                   meta["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def source_probs(self, window: int) -> np.ndarray:
        """P(window from source) proportional to weight x number of possible windows."""
        w = np.array([s["weight"] * max(0, s["train"][1] - window) for s in self.sources], dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError(f"no source has more than {window} training tokens")
        return w / w.sum()

    def sample_windows(self, rng: np.random.Generator, batch: int, window: int) -> np.ndarray:
        """[batch, window] int64 token ids, each a random window of one source's training tokens."""
        src = rng.choice(len(self.sources), size=batch, p=self.source_probs(window))
        offs = np.array([self.sources[s]["train"][0] for s in src])
        lens = np.array([self.sources[s]["train"][1] for s in src])
        starts = offs + (rng.random(batch) * (lens - window)).astype(np.int64)
        return self.train[starts[:, None] + np.arange(window)[None, :]].astype(np.int64)

    def heldout_windows(self, window: int, max_per_source: int | None = None) -> list[tuple[str, np.ndarray]]:
        """Non-overlapping held-out windows [window] per source, in order (the tail shorter than a window
        is dropped)."""
        out = []
        for s in self.sources:
            off, n = s["heldout"]
            count = n // window if max_per_source is None else min(n // window, max_per_source)
            out += [(s["name"], self.heldout[off + i * window: off + (i + 1) * window].astype(np.int64))
                    for i in range(count)]
        return out
