"""Train a small byte-level BPE tokenizer offline (for `mcserve init-model`) and write it in HF format."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mcserve.server.text.tokenizer import CONFIG_FILE, DEFAULT_CHAT_TEMPLATE, DEFAULT_EOS_TOKEN, TOKENIZER_FILE

DEFAULT_SPECIAL_TOKENS = (DEFAULT_EOS_TOKEN, "<|im_start|>", "<|im_end|>")
BYTE_ALPHABET_SIZE = 256


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    split_digits: bool = False,
) -> tokenizers.Tokenizer:
    """Byte-level BPE: every byte is a token, so any text encodes without an unknown token.

    Special tokens get the first ids (0, 1, ...) in the given order; training is deterministic for a
    given corpus and vocab size. `split_digits` makes every digit its own token (numbers never merge),
    which lets a small model learn arithmetic digit by digit.
    """
    minimum = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be >= {minimum} (256 bytes + {len(special_tokens)} special tokens), got {vocab_size}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer_files(
    directory: str | Path,
    tok: tokenizers.Tokenizer,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    bos: str | None = None,
    eos: str | None = DEFAULT_EOS_TOKEN,
    pad: str | None = DEFAULT_EOS_TOKEN,
    add_bos_token: bool = False,
) -> None:
    """Writes tokenizer.json and tokenizer_config.json into `directory` (created if missing)."""
    for field, token in (("bos", bos), ("eos", eos), ("pad", pad)):
        if token is not None and tok.token_to_id(token) is None:
            raise ValueError(f"{field} token {token!r} is not in the tokenizer's vocabulary")
    if add_bos_token and bos is None:
        raise ValueError("add_bos_token=True needs a bos token, got bos=None")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": add_bos_token,
        "chat_template": chat_template,
    }
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def builtin_corpus() -> list[str]:
    """The English sample shipped in server/data/sample_corpus.txt, one paragraph per item."""
    text = (resources.files("mcserve.server") / "data" / "sample_corpus.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]
