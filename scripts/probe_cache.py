"""Two CPU probes of a model's cache and copying behind docs/MODEL.md's "What the cache does" and
"Fine-tuning the shipped model on repeated spans" (issue 13). Serving path, float32.

    python scripts/probe_cache.py splice --model server/data/default_model
    python scripts/probe_cache.py copy --model server/data/default_model --data-dir .chat_data
    python scripts/probe_cache.py sources --model server/data/default_model --data-dir .chat_data

splice: the loss with the model's own aggregation and served as `none` on the two parts of
tests/server/data/heldout_sample.txt (Austen, then the World English Bible), on the Bible part alone,
and on pairs of the probe documents of tests/server/data/mc_heldout_sources.json (the first 512
tokens of one, then of another; the gain on the second, with and without the first before it).
copy: held-out spans of 8, 32, 128 and 400 tokens written twice 16 tokens apart (6 windows each):
the loss on the first copy and on the second (a model that copies predicts the second far better),
and the cache's gain on held-out repeated spans (`mctrain.evaluation.repeat_gain`, 8 windows).
sources: the cache's gain on the first 1,024 held-out tokens of every source of the corpus, the ones
not in the committed probe file included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mctrain.evaluation import repeat_gain, repeat_windows, serving_logits  # noqa: E402
from mctrain.repeat import RepeatTask  # noqa: E402
from mctrain.token_data import TokenData  # noqa: E402

from mcserve.server.model.loader import load_model  # noqa: E402
from mcserve.server.text.tokenizer import Tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "server" / "data"


def nll(model, ids) -> torch.Tensor:
    """Per-target NLL [len(ids) - 1] through the serving prefill path."""
    lg = serving_logits(model, ids)
    return torch.nn.functional.cross_entropy(lg[:-1].float(), torch.as_tensor(list(ids[1:])), reduction="none")


def splice(own, none, tok: Tokenizer) -> None:
    text = (DATA / "heldout_sample.txt").read_text(encoding="utf-8")
    cut = text.index("The second woe")  # where the Bible passage starts
    n_a = len(tok.encode(text[:cut], add_special_tokens=False))
    ids = tok.encode(text, add_special_tokens=False)
    o, z = nll(own, ids), nll(none, ids)
    bible = tok.encode(text[cut:], add_special_tokens=False)
    bo, bz = nll(own, bible), nll(none, bible)
    print(f"heldout_sample.txt: switch at token {n_a} of {len(ids)}")
    print(f"  first part  own {o[:n_a - 1].mean():.3f} none {z[:n_a - 1].mean():.3f}")
    print(f"  second part own {o[n_a - 1:].mean():.3f} none {z[n_a - 1:].mean():.3f}")
    print(f"  second part alone own {bo.mean():.3f} none {bz.mean():.3f}")
    docs = {k: tok.encode(v, add_special_tokens=False)
            for k, v in json.loads((DATA / "mc_heldout_sources.json").read_text(encoding="utf-8"))["samples"].items()}
    names, alone, after = list(docs), [], []
    for i, a in enumerate(names):
        b = names[(i + 3) % len(names)]
        g_alone = float(nll(none, docs[b][:512]).mean() - nll(own, docs[b][:512]).mean())
        sp = docs[a][:512] + docs[b][:512]
        so, sz = nll(own, sp)[511:], nll(none, sp)[511:]
        alone.append(g_alone)
        after.append(float(sz.mean() - so.mean()))
        print(f"  {a:>8} then {b:>8}: gain on {b} alone {g_alone:+.4f}, after {a} {after[-1]:+.4f} "
              f"(own {so.mean():.3f}, none {sz.mean():.3f})")
    print(f"mean gain alone {np.mean(alone):+.4f}, after another document {np.mean(after):+.4f}")


def copy(own, data_dir: str) -> None:
    held = TokenData.load(data_dir).heldout
    rng = np.random.default_rng(0)
    task = RepeatTask(max_span=1000)
    for span in (8, 32, 128, 400):
        W = 2 * span + 16 + 64
        first, second = [], []
        for s in rng.integers(0, len(held) - W, 6):
            seq = task.make(held[s:s + W].astype(np.int64), span, 16, 64)
            x = nll(own, seq.ids)
            first.append(x[64:63 + span].mean())
            second.append(x[seq.copy_start:seq.copy_start + span - 1].mean())
        print(f"span {span}: first copy {np.mean(first):.3f}, second copy {np.mean(second):.3f}")
    for W, span in ((1025, 480), (1025, 200), (1601, 750)):
        g = repeat_gain(own, repeat_windows(RepeatTask(max_span=span), held, W, 8), autocast_dtype=None,
                        backend="torch")
        print(f"repeat gain, {W}-token windows, span {span}: own {g['own']:.4f} none {g['none']:.4f} "
              f"gain {g['gain']:+.4f}")


def sources(own, none, tok: Tokenizer, data_dir: str) -> None:
    held = json.loads((Path(data_dir) / "heldout_text.json").read_text(encoding="utf-8"))
    gains = []
    for name, text in sorted(held.items()):
        ids = tok.encode(text, add_special_tokens=False)[:1024]
        gains.append(float(nll(none, ids).mean() - nll(own, ids).mean()))
        print(f"{name:>20}: gain {gains[-1]:+.4f}")
    print(f"mean gain {np.mean(gains):+.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["splice", "copy", "sources"])
    ap.add_argument("--model", default="server/data/default_model")
    ap.add_argument("--data-dir", help="copy, sources: scripts/build_chat_data.py's folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    own = load_model(args.model, dtype="float32", device="cpu")
    if args.probe == "splice":
        splice(own, load_model(args.model, dtype="float32", device="cpu", aggregation="none"),
               Tokenizer.from_dir(args.model))
    elif not args.data_dir:
        raise SystemExit(f"{args.probe} needs --data-dir")
    elif args.probe == "copy":
        copy(own, args.data_dir)
    else:
        sources(own, load_model(args.model, dtype="float32", device="cpu", aggregation="none"),
                Tokenizer.from_dir(args.model), args.data_dir)


if __name__ == "__main__":
    main()
