"""The plain-text training corpus: source files, their sampling weights, and the held-out split.

A corpus is a folder of `*.txt` files (one per source, as ../shared/data/build_corpus.sh writes them).
The last `heldout_frac` of every source, cut at a paragraph boundary, is held out: neither the
tokenizer nor the model trains on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Sampling weight per source (relative to its size). The corpus is ~58% religious or archaic prose;
# these weights give Austen, the World English Bible and the Wikipedia leads a larger share for a
# more modern voice (see ../shared/data/README.md).
SOURCE_WEIGHTS: dict[str, float] = {
    "austen": 2.0,
    "wiki_vital_CC-BY-SA": 2.0,
    "web": 1.5,
    "shakespeare": 1.0,
    "fortunes": 1.0,
    "devil": 1.0,
    "jargon": 1.0,
    "kjv": 0.6,
    "mhcc": 0.6,
    "tdavid": 0.4,
}
DEFAULT_WEIGHT = 1.0
HELDOUT_FRAC = 0.01
EOT = "<|endoftext|>"
KV_TOKEN, QUERY_TOKEN = "<|kv|>", "<|query|>"
# Ids 0..4 in this order; the first three are the server's defaults (end of text, ChatML markers),
# the last two mark the two halves of an associative-recall sequence (mctrain.recall).
SPECIAL_TOKENS = (EOT, "<|im_start|>", "<|im_end|>", KV_TOKEN, QUERY_TOKEN)


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    weight: float
    train_text: str
    heldout_text: str

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")


def split_heldout(text: str, frac: float) -> tuple[str, str]:
    """(train, held-out): the held-out part is the last `frac` of the text, starting at a paragraph."""
    if not 0 < frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {frac}")
    cut = int(len(text) * (1 - frac))
    para = text.find("\n\n", cut)
    if para < 0:
        para = text.find("\n", cut)
    if para < 0:
        para = cut
    return text[:para].rstrip("\n") + "\n", text[para:].lstrip("\n")


def read_corpus(corpus_dir: str | Path, heldout_frac: float = HELDOUT_FRAC,
                weights: dict[str, float] | None = None) -> list[Source]:
    """Every `*.txt` in `corpus_dir`, sorted by name, split into train and held-out text."""
    root = Path(corpus_dir)
    files = sorted(root.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt files in {root} (build it with ../shared/data/build_corpus.sh)")
    table = SOURCE_WEIGHTS if weights is None else weights
    sources = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        train, heldout = split_heldout(text, heldout_frac)
        sources.append(Source(f.stem, table.get(f.stem, DEFAULT_WEIGHT), train, heldout))
    return sources


def paragraphs(text: str, max_chars: int = 4000) -> Iterator[str]:
    """Blank-line separated paragraphs, long ones cut at line ends (the BPE trainer's documents)."""
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = max_chars if cut <= 0 else cut
            yield para[:cut]
            para = para[cut:]
        if para.strip():
            yield para


def weighted_documents(sources: list[Source]) -> Iterator[str]:
    """Training paragraphs, each source repeated `weight` times (a fractional weight takes that
    fraction of its paragraphs), so that BPE merges follow the same mix the model trains on."""
    for src in sources:
        paras = list(paragraphs(src.train_text))
        whole, frac = int(src.weight), src.weight - int(src.weight)
        for _ in range(whole):
            yield from paras
        yield from paras[: int(len(paras) * frac)]


def text_blocks(text: str, block_chars: int = 1 << 16) -> list[str]:
    """The text cut into blocks of about `block_chars` at paragraph starts, for batch encoding.
    Concatenated, the blocks are the text again."""
    blocks, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + block_chars)
        end = len(text) if end < 0 else end + 2
        blocks.append(text[start:end])
        start = end
    return blocks
