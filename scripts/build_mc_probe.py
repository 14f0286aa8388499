"""Build the committed long-text probe of whether a model's Memory Caching lowers its loss (issue 13).

    python scripts/build_mc_probe.py --data-dir .chat_data --out tests/server/data/mc_heldout_sources.json

The rule, fixed before anything was measured on it: for every public-domain source of the corpus
(../shared/data/README.md; the MIT, BSD and CC BY-SA sources are left out so that the repository
holds no text that needs a notice), the first TOKENS tokens of its held-out tail (text no model of
this project trained on), cut by the tokenizer of --data-dir and stored as text. One document per
sample: every training window comes from one source, and a sample that splices two documents
measures something else (docs/MODEL.md, "What the cache does").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tokenizers

PUBLIC_DOMAIN = ("austen", "devil", "jargon", "kjv", "mhcc", "tdavid", "web")
TOKENS = 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="scripts/build_chat_data.py's folder (heldout_text.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    args = ap.parse_args(argv)
    root = Path(args.data_dir)
    held = json.loads((root / "heldout_text.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    missing = [s for s in PUBLIC_DOMAIN if s not in held]
    if missing:
        raise SystemExit(f"{root}/heldout_text.json has no held-out text for {missing}")
    samples = {}
    for name in PUBLIC_DOMAIN:
        ids = tok.encode(held[name], add_special_tokens=False).ids
        if len(ids) < args.tokens:
            raise SystemExit(f"{name}: {len(ids)} held-out tokens < {args.tokens}")
        samples[name] = tok.decode(ids[: args.tokens], skip_special_tokens=False)
    doc = dict(rule=f"the first {args.tokens} tokens of the held-out tail of every public-domain source "
               "(scripts/build_mc_probe.py)", samples=samples)
    Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(samples)} samples, {sum(len(s) for s in samples.values())} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
