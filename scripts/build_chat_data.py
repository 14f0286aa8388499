"""Build the chat model's data folder: tokenizer retrained on text + chat, text arrays, chat arrays.

    apt-get update && OUT=/tmp/corpus bash ../shared/data/build_corpus.sh
    OUT=/tmp/chat_sources bash scripts/fetch_chat_sources.sh
    python scripts/build_chat_data.py --corpus /tmp/corpus --sources /tmp/chat_sources --out .chat_data

The folder is what the GPU job (scripts/gpu_train_chat.sh) carries, so it must stay small (the
carry limit is 64 MiB with the repository): the training text is capped per source (TEXT_CAPS,
characters; the held-out tails are kept whole, the same as the earlier runs'), and the mask is bit-packed.
Writes OUT/tokenizer/, train.npy, heldout.npy, meta.json (mctrain.token_data), chat_*.npy,
chat_meta.json, chat_heldout.jsonl (mctrain.chat_data) and heldout_text.json (raw held-out text per
source, for bits per byte under any tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mctrain import chat_data, chat_sources  # noqa: E402
from mctrain.corpus import EOT, SPECIAL_TOKENS, Source, paragraphs, read_corpus  # noqa: E402
from mctrain.token_data import TOKENIZER_DIR, build_token_data  # noqa: E402

from mcserve.server.text.tokenizer import Tokenizer  # noqa: E402
from mcserve.server.text.tokenizer_train import train_byte_level_bpe, write_tokenizer_files  # noqa: E402

# Characters of each source's training text kept (None: all). The religious commentaries and the KJV
# were 58% of the earlier model's text and gave it its voice; a chat model needs them least.
TEXT_CAPS: dict[str, int | None] = {
    "austen": None, "wiki_vital_CC-BY-SA": None, "jargon": None, "devil": None,
    "web": 1_500_000, "shakespeare": 1_200_000, "fortunes": 1_500_000, "kjv": 400_000, "mhcc": 400_000,
    "tdavid": 400_000,
}


def capped(sources: list[Source]) -> list[Source]:
    out = []
    for s in sources:
        cap = TEXT_CAPS.get(s.name)
        text = s.train_text
        if cap is not None and len(text) > cap:
            cut = text.rfind("\n\n", 0, cap)
            cut = cut if cut > 0 else text.rfind("\n", 0, cap)  # a source without blank lines (the KJV)
            text = text[:cut if cut > 0 else cap]
        out.append(Source(s.name, 1.0, text, s.heldout_text))
    return out


def tokenizer_documents(sources: list[Source], chats: list[list[dict]]):
    """The BPE trainer's input: text paragraphs and chat messages (role line + content), as trained on."""
    for s in sources:
        yield from paragraphs(s.train_text)
    for conv in chats:
        yield "\n".join(f"{m['role']}\n{m['content']}" for m in conv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="folder of *.txt (../shared/data/build_corpus.sh)")
    ap.add_argument("--sources", required=True, help="folder of scripts/fetch_chat_sources.sh")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = capped(read_corpus(args.corpus))
    chats = chat_sources.build(args.sources, seed=args.seed)
    train = [c for tr, _ in chats.values() for c in tr]
    held = [c for _, h in chats.values() for c in h]
    random.Random(args.seed).shuffle(train)
    print(f"{len(train)} training / {len(held)} held-out conversations; text "
          f"{sum(len(s.train_text) for s in sources) / 1e6:.1f}M chars ({time.time() - t0:.0f}s)", flush=True)

    tok = train_byte_level_bpe(tokenizer_documents(sources, train), args.vocab_size, SPECIAL_TOKENS, split_digits=True)
    write_tokenizer_files(out / TOKENIZER_DIR, tok, bos=EOT, eos=EOT, pad=EOT)
    served = Tokenizer.from_dir(out / TOKENIZER_DIR)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.0f}s)", flush=True)

    meta = build_token_data(sources, out)
    chat_meta = chat_data.write(out, tok, lambda ms: served.apply_chat_template(ms, add_generation_prompt=False),
                                train, held, {k: dict(train=len(tr), heldout=len(h)) for k, (tr, h) in chats.items()})
    (out / "heldout_text.json").write_text(json.dumps({s.name: s.heldout_text for s in sources}) + "\n")
    text_tokens = sum(s["train"][1] for s in meta["sources"])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"text {text_tokens / 1e6:.2f}M tokens; chat {chat_meta['train']['tokens'] / 1e6:.2f}M tokens "
          f"({chat_meta['train']['scored'] / 1e6:.2f}M scored); folder {size / 2**20:.1f} MiB "
          f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
