"""Evaluate a chat model: held-out text and chat perplexity, fixed chat prompts, arithmetic, MC probes.

    python scripts/eval_chat.py --model runs/chat/model --data-dir .chat_data --out runs/chat_eval.json \
        --md runs/chat_eval.md
    python scripts/eval_chat.py --model server/data/default_model --data-dir .chat_data --out before.json  # any model

Everything is tokenised with the model's own tokenizer from raw text (the data folder's
heldout_text.json and chat_heldout.jsonl), so models with different tokenizers compare in bits per
byte (text) and per-assistant-byte loss (chat). Prompts and arithmetic go through the offline engine
(`LLM`: the server's scheduler, prefill, decode and sampler), greedy with repetition penalty 1.1;
the MC probes through the serving prefill path with the model's own aggregation and served as `none`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mctrain import chat_data, chat_eval  # noqa: E402
from mctrain.corpus import KV_TOKEN, QUERY_TOKEN  # noqa: E402
from mctrain.evaluation import heldout_nll, masked_nll, serving_logits, token_bytes  # noqa: E402
from mctrain.recall import RecallTask  # noqa: E402

from mcserve.server.engine.llm import LLM  # noqa: E402
from mcserve.server.engine.sampling_params import SamplingParams  # noqa: E402
from mcserve.server.model.loader import load_model  # noqa: E402
from mcserve.server.text.tokenizer import Tokenizer  # noqa: E402

# held-out public-domain text spliced from two documents (tests/server/data/heldout_sample.txt), the
# same text twice, and one held-out document per public-domain source (scripts/build_mc_probe.py)
MC_PROBES = ("tests/server/data/heldout_sample.txt", "tests/server/data/mc_repeat_sample.txt")
MC_DOCUMENTS = "tests/server/data/mc_heldout_sources.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--data-dir", required=True, help="scripts/build_chat_data.py's folder")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, help="per source / of chat (default: all)")
    ap.add_argument("--arith", type=int, default=200, help="problems per arithmetic set")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--md")
    return ap.parse_args(argv)


def text_windows(tok: Tokenizer, texts: dict[str, str], window: int, limit: int | None) -> list[tuple[str, np.ndarray]]:
    out = []
    for name, text in texts.items():
        ids = np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.int64)
        n = len(ids) // window if limit is None else min(len(ids) // window, limit)
        out += [(name, ids[i * window:(i + 1) * window]) for i in range(n)]
    return out


def chat_heldout(tok: Tokenizer, path: Path, window: int, limit: int | None) -> tuple[list, int]:
    """Held-out chat windows (ids, mask) under this tokenizer, and the UTF-8 bytes of the scored tokens."""
    convs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids, mask = chat_data.encode_all(tok.backend, lambda ms: tok.apply_chat_template(ms, add_generation_prompt=False),
                                     convs)
    n = len(ids) // window if limit is None else min(len(ids) // window, limit)
    wins = [(ids[i * window:(i + 1) * window].astype(np.int64), mask[i * window:(i + 1) * window]) for i in range(n)]
    nbytes = token_bytes(tok.backend)
    scored_bytes = int(sum(nbytes[w[1:][m[1:]]].sum() for w, m in wins))
    return wins, scored_bytes


def generate(llm: LLM, tok: Tokenizer, questions: list[str], max_tokens: int) -> list[str]:
    prompts = [tok.encode(tok.apply_chat_template([dict(role="user", content=q)], add_generation_prompt=True),
                          add_special_tokens=False) for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.1, seed=0)
    return [o.outputs[0].text.strip() for o in llm.generate(prompts, params)]


def mc_probes(model_dir: str, tok: Tokenizer, device: torch.device) -> dict:
    """Serving-path mean NLL of each probe file with the model's aggregation and served as `none`
    (a repeat sample is scored on its second copy only, where recall of the first can help)."""
    own = load_model(model_dir, dtype="float32" if device.type == "cpu" else "auto", device=device)
    none = load_model(model_dir, dtype="float32" if device.type == "cpu" else "auto", device=device,
                      aggregation="none")
    texts = [(Path(f).name, Path(f).read_text(encoding="utf-8"), "repeat" in f) for f in MC_PROBES if Path(f).is_file()]
    if Path(MC_DOCUMENTS).is_file():
        docs = json.loads(Path(MC_DOCUMENTS).read_text(encoding="utf-8"))["samples"]
        texts += [(f"{Path(MC_DOCUMENTS).stem}:{name}", text, False) for name, text in docs.items()]
    out = {}
    for label, text, repeat in texts:
        ids = tok.encode(text, add_special_tokens=False)
        start = len(ids) // 2 if repeat else 0
        row = dict(tokens=len(ids), scored_from=start)
        for name, model in (("own", own), ("none", none)):
            lg = serving_logits(model, ids)
            nll = torch.nn.functional.cross_entropy(lg[:-1].float(), torch.as_tensor(ids[1:], device=lg.device),
                                                    reduction="none")[start:]
            row[name] = float(nll.mean())
        row["none_minus_own"] = row["none"] - row["own"]
        out[label] = row
    return dict(aggregation=own.spec.aggregation, probes=out, recall=recall_probe(own, none, tok))


def recall_probe(own, none, tok: Tokenizer, n_seqs: int = 16) -> dict:
    """MQAR in held-out text as trained (mctrain.recall; 16 pairs, ~600 filler tokens between pairs
    and queries): accuracy and answer NLL with the model's aggregation and served as `none`."""
    text = np.asarray(tok.encode(Path(MC_PROBES[0]).read_text(encoding="utf-8"), add_special_tokens=False))
    task = RecallTask(tok.vocab_size, tok.token_to_id(KV_TOKEN), tok.token_to_id(QUERY_TOKEN))
    rng = np.random.default_rng(0)
    n, L = 16, min(len(text), 700)
    gap = L - 16 - task.length_needed(n, n)
    seqs = [task.make(rng, text[:L], n, gap, 8) for _ in range(n_seqs)]
    out = {}
    for name, model in (("own", own), ("none", none)):
        hits = nll = 0.0
        for s in seqs:
            lg = serving_logits(model, s.ids)[torch.as_tensor(s.query_pos, device=model.device)].float()
            ans = torch.as_tensor(s.answers, device=lg.device)
            hits += float((lg.argmax(-1) == ans).sum())
            nll += float(torch.nn.functional.cross_entropy(lg, ans, reduction="sum"))
        out[name] = dict(acc=hits / (n * n_seqs), answer_nll=nll / (n * n_seqs))
    return dict(pairs=n, gap=gap, sequences=n_seqs, **out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    root = Path(args.data_dir)
    tok = Tokenizer.from_dir(args.model)
    res: dict = dict(model=args.model, device=str(device))
    training = Path(args.model) / "training.json"
    if training.is_file():
        t = json.loads(training.read_text())
        res["training"] = {k: t.get(k) for k in ("steps", "tokens", "train_seconds", "gpu", "aggregation", "batch_size",
                                                 "chat_frac", "recall_frac", "decay_init", "params", "backend")}
    model = load_model(args.model, dtype="auto", device=device)
    res["params"] = sum(p.numel() for p in model.parameters())
    texts = json.loads((root / "heldout_text.json").read_text(encoding="utf-8"))
    windows = text_windows(tok, texts, args.seq_len + 1, args.max_windows)
    res["text"] = heldout_nll(model, windows, token_bytes(tok.backend), autocast_dtype=torch.bfloat16)
    wins, scored_bytes = chat_heldout(tok, root / "chat_heldout.jsonl", args.seq_len + 1, args.max_windows)
    chat = masked_nll(model, wins, autocast_dtype=torch.bfloat16)
    chat["bpb"] = chat["loss"] * chat["tokens"] / math.log(2) / max(scored_bytes, 1)
    res["chat"] = chat
    print(f"text ppl {res['text']['ppl']:.2f} bpb {res['text']['bpb']:.3f}; chat ppl {chat['ppl']:.2f} "
          f"bpb {chat['bpb']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    del model

    llm = LLM(args.model, device=str(device), max_num_seqs=64)
    answers = generate(llm, tok, [p for p, _ in chat_eval.PROMPTS], args.max_tokens)
    res["prompts"] = [dict(prompt=p, answer=a, words=list(w), on_topic=chat_eval.on_topic(a, w))
                      for (p, w), a in zip(chat_eval.PROMPTS, answers, strict=True)]
    res["on_topic"] = sum(r["on_topic"] for r in res["prompts"])
    res["arithmetic"] = {}
    for name, held, hi in (("held_out_small", True, 20), ("held_out_all", True, 99), ("trained_small", False, 20)):
        probs = chat_eval.arithmetic_problems(held, args.arith, hi)
        replies = generate(llm, tok, [q for q, _ in probs], 16)
        hits = [chat_eval.answer_number(r) == a for (_, a), r in zip(probs, replies, strict=True)]
        res["arithmetic"][name] = dict(exact_match=sum(hits) / max(len(hits), 1), problems=len(hits),
                                       examples=[dict(q=q, a=a, reply=r) for (q, a), r in
                                                 list(zip(probs, replies, strict=True))[:5]])
    del llm
    res["mc"] = mc_probes(args.model, tok, device)
    res["eval_seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    md = markdown(res)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    return res


def markdown(res: dict) -> str:
    a = res["arithmetic"]
    lines = ["| model | params | text ppl | text bits/byte | chat ppl | chat bits/byte | on-topic prompts | "
             "arithmetic EM held-out small / all / trained small |", "|---|---|---|---|---|---|---|---|",
             f"| {res['model']} | {res['params'] / 1e6:.2f}M | {res['text']['ppl']:.2f} | {res['text']['bpb']:.3f} "
             f"| {res['chat']['ppl']:.2f} | {res['chat']['bpb']:.3f} | {res['on_topic']} / {len(res['prompts'])} | "
             + " / ".join(f"{100 * a[k]['exact_match']:.1f}%" for k in ("held_out_small", "held_out_all",
                                                                      "trained_small")) + " |", "",
             f"MC probes (serving path, mean NLL; model aggregation {res['mc']['aggregation']}):", "",
             "| sample | tokens | scored from | own | as none | none - own |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['tokens']} | {r['scored_from']} | {r['own']:.4f} | {r['none']:.4f} | "
              f"{r['none_minus_own']:+.4f} |" for n, r in res["mc"]["probes"].items()]
    rc = res["mc"]["recall"]
    lines += ["", f"Recall probe ({rc['pairs']} pairs, gap {rc['gap']}, {rc['sequences']} sequences): accuracy own "
              f"{100 * rc['own']['acc']:.1f}% vs as none {100 * rc['none']['acc']:.1f}%; answer NLL "
              f"{rc['own']['answer_nll']:.3f} vs {rc['none']['answer_nll']:.3f}"]
    lines += ["", "Fixed prompts (greedy, repetition penalty 1.1):", ""]
    for r in res["prompts"]:
        answer = r["answer"].replace("\n", " ")
        lines.append(f"- **{r['prompt']}** {'(on topic)' if r['on_topic'] else '(off topic)'}: {answer}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
