"""Evaluate trained MC-GDN checkpoints: held-out perplexity and bits per byte, associative recall.

    python scripts/eval.py --data-dir .train_data --model ssc=runs/ssc/model --model none=runs/none/model \
        --variants grm,none --out runs/eval.json --md runs/eval.md --plot runs/recall.png
    # combine the JSON of separate runs (e.g. one per GPU job) into one table and plot:
    python scripts/eval.py --merge runs/eval_ssc.json runs/eval_none.json --out docs/model/eval.json \
        --md docs/model/eval.md --plot docs/model/recall.png

Every model is loaded with `load_model` (bf16 on GPU, as served). A model that reads the cache is
also evaluated with its router switched to each of --variants (`load_model(dir, aggregation=...)`),
named NAME-as-VARIANT. Recall goes through the serving prefill path; perplexity through the batched
training forward in eval mode (the JSON's `agreement` is the relative difference of the two on one
recall sequence).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from mctrain.corpus import KV_TOKEN, QUERY_TOKEN  # noqa: E402
from mctrain.evaluation import heldout_nll, recall_eval, recall_suite, serving_logits, token_bytes  # noqa: E402
from mctrain.mc_forward import forward_logits  # noqa: E402
from mctrain.recall import RecallTask  # noqa: E402
from mctrain.report import markdown, plot  # noqa: E402
from mctrain.token_data import TokenData  # noqa: E402

from mcserve.server.model.loader import load_model  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier results instead of evaluating")
    ap.add_argument("--data-dir", help="the training data folder (tokenizer + held-out tokens)")
    ap.add_argument("--variants", default="grm,none", help="aggregations to also serve cache-reading models with")
    ap.add_argument("--n-pairs", default="8,16,32,64,96")
    ap.add_argument("--gaps", default="0,128,384,768,1536")
    ap.add_argument("--per-cell", type=int, default=8, help="recall sequences per (pairs, gap) cell; 0 skips recall")
    ap.add_argument("--recall-seconds", type=float, help="time limit of the recall eval per model (all cells "
                    "keep equal counts up to it: the suite runs round by round)")
    ap.add_argument("--seq-len", type=int, default=1024, help="held-out window length")
    ap.add_argument("--heldout-windows", type=int, default=None, help="per source (default: all)")
    ap.add_argument("--sample-text", help="also report serving-path perplexity on this text file")
    ap.add_argument("--sample-tokens", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--md", help="markdown tables")
    ap.add_argument("--plot", help="recall curves PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    if not args.merge and (not args.model or not args.data_dir):
        ap.error("give --model NAME=DIR (one or more) and --data-dir, or --merge JSON...")
    return args


def sample_ppl(model, tok, text: str, max_tokens: int) -> float:
    """Serving-path perplexity of the first `max_tokens` tokens of a text."""
    ids = tok.encode(text).ids[:max_tokens]
    lg = serving_logits(model, ids)
    nll = torch.nn.functional.cross_entropy(lg[:-1].float(), torch.as_tensor(ids[1:], device=lg.device))
    return float(torch.exp(nll))


def evaluate_model(name: str, model_dir: str, aggregation: str | None, args, data: TokenData, tok, suite,
                   device: torch.device) -> dict:
    t0 = time.time()
    overrides = {} if aggregation is None else dict(aggregation=aggregation)
    model = load_model(model_dir, dtype=args.dtype, device=device, **overrides)
    entry = dict(dir=str(model_dir), served_aggregation=model.spec.aggregation, segment_size=model.spec.segment_size,
                 top_k=model.spec.top_k, params=sum(p.numel() for p in model.parameters()),
                 dtype=str(model.dtype).removeprefix("torch."))
    training = Path(model_dir) / "training.json"
    if training.is_file():
        t = json.loads(training.read_text())
        entry["training"] = {k: t.get(k) for k in ("steps", "tokens", "train_seconds", "gpu", "aggregation",
                                                   "batch_size", "seq_len", "lr")}
    windows = data.heldout_windows(args.seq_len + 1, args.heldout_windows)
    if windows:
        entry["heldout"] = heldout_nll(model, windows, token_bytes(tok))
    if args.sample_text:
        entry["sample_ppl"] = sample_ppl(model, tok, Path(args.sample_text).read_text(), args.sample_tokens)
    if suite:
        seq = suite[0][2]
        with torch.no_grad():
            a = serving_logits(model, seq.ids)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                b = forward_logits(model, torch.as_tensor(seq.ids, device=device)[None])[0]
        entry["agreement"] = dict(rel_diff=float((a - b).norm() / a.norm()),
                                  argmax_match=float((a.argmax(-1) == b.argmax(-1)).float().mean()))
        bar = tqdm(total=len(suite), desc=name, mininterval=5.0) if tqdm else None
        deadline = None if args.recall_seconds is None else time.time() + args.recall_seconds
        entry["recall"] = recall_eval(model, suite, progress=(lambda: bar.update(1)) if bar else None,
                                      deadline=deadline)
        if bar:
            bar.close()
    entry["eval_seconds"] = time.time() - t0
    h = entry.get("heldout", {})
    print(f"{name}: held-out ppl {h.get('ppl', float('nan')):.2f} bpb {h.get('bpb', float('nan')):.3f} "
          f"recall {(entry.get('recall') or {}).get('overall')} ({entry['eval_seconds']:.0f}s)", flush=True)
    return entry


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        results: dict = dict(models={}, settings={})
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            results["models"].update(part["models"])
            results["settings"][Path(f).name] = part.get("settings", {})
    else:
        import tokenizers

        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        data = TokenData.load(args.data_dir)
        tok = tokenizers.Tokenizer.from_file(str(data.tokenizer_dir / "tokenizer.json"))
        task = RecallTask(data.vocab_size, tok.token_to_id(KV_TOKEN), tok.token_to_id(QUERY_TOKEN))
        n_pairs = [int(x) for x in args.n_pairs.split(",")]
        gaps = [int(x) for x in args.gaps.split(",")]
        suite = recall_suite(task, data.heldout, n_pairs, gaps, args.per_cell, args.seed) if args.per_cell else []
        variants = [v for v in args.variants.split(",") if v]
        results = dict(models={}, settings=dict(n_pairs=n_pairs, gaps=gaps, per_cell=args.per_cell, seed=args.seed,
                                                device=str(device), gpu=torch.cuda.get_device_name(device)
                                                if device.type == "cuda" else None))
        for spec in args.model:
            name, _, model_dir = spec.partition("=")
            if not model_dir:
                raise SystemExit(f"--model wants NAME=DIR, got {spec!r}")
            results["models"][name] = evaluate_model(name, model_dir, None, args, data, tok, suite, device)
            if results["models"][name]["served_aggregation"] != "none":
                for v in variants:
                    results["models"][f"{name}-as-{v}"] = evaluate_model(f"{name}-as-{v}", model_dir, v, args, data,
                                                                         tok, suite, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    print(table)
    if args.md:
        Path(args.md).write_text(table)
    if args.plot and not plot(results, args.plot):
        print("matplotlib is not installed: no plot (run --merge on a machine with it)")
    return results


if __name__ == "__main__":
    main()
