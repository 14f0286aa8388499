"""Train the byte-level BPE tokenizer of the MC training runs on a plain-text corpus.

    python scripts/train_tokenizer.py --corpus /tmp/corpus --out .train_data/tokenizer

Trains on the training part of every source (the held-out tail is excluded), weighted as in
mctrain.corpus.SOURCE_WEIGHTS, and writes tokenizer.json + tokenizer_config.json (ChatML template).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mctrain.corpus import EOT, HELDOUT_FRAC, SPECIAL_TOKENS, read_corpus, weighted_documents  # noqa: E402

from mcserve.server.text.tokenizer_train import train_byte_level_bpe, write_tokenizer_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="folder of *.txt sources")
    ap.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--heldout-frac", type=float, default=HELDOUT_FRAC)
    args = ap.parse_args(argv)

    t0 = time.time()
    sources = read_corpus(args.corpus, args.heldout_frac)
    tok = train_byte_level_bpe(weighted_documents(sources), args.vocab_size, SPECIAL_TOKENS)
    write_tokenizer_files(args.out, tok, bos=EOT, eos=EOT, pad=EOT)
    sample = sources[0].heldout_text[:20000]
    n = len(tok.encode(sample).ids)
    print(f"vocab {tok.get_vocab_size()} from {len(sources)} sources in {time.time() - t0:.0f}s; "
          f"{len(sample.encode()) / max(n, 1):.2f} bytes/token on held-out {sources[0].name}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
