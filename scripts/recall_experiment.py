"""The recall experiment of issue 13: does Memory Caching recall what one recurrent state cannot hold?

Two models identical but for the aggregation (`grm`, a differentiable router over every checkpoint,
vs `none`, a plain Gated DeltaNet) train on pure synthetic MQAR (scripts/mctrain/mqar.py) from the
same seed, batches and schedule; then both are evaluated through the serving path, the MC model
also served as `ssc` (top-k) and as `none` (its cache switched off).

    python scripts/recall_experiment.py train --aggregation grm --out runs/recall/grm --steps 3000
    python scripts/recall_experiment.py train --aggregation none --out runs/recall/none --steps 3000
    python scripts/recall_experiment.py eval --model grm=runs/recall/grm/model --model none=runs/recall/none/model \
        --out docs/model/recall_mqar.json --md docs/model/recall_mqar.md --plot docs/model/recall_mqar.png

`scripts/run_recall.sh` runs all three (CPU or GPU).
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
from mctrain import mqar, mqar_eval  # noqa: E402
from mctrain.checkpoint import DECAY_INITS, count_parameters, init_model, save_checkpoint, train_config  # noqa: E402
from mctrain.evaluation import autocast_for  # noqa: E402
from mctrain.mc_forward import hidden_states, logits  # noqa: E402
from mctrain.schedule import CosineSchedule  # noqa: E402
from mctrain.train_state import add_state_args, load_state, save_state  # noqa: E402
from mctrain.train_step import TrainStep, add_step_args, make_optimizer, mqar_loss, use_graph  # noqa: E402

from mcserve.server.model.loader import load_model  # noqa: E402

EVAL_PAIRS = (4, 8, 16, 32, 64, 96, 128, 160)


def task_of(args: argparse.Namespace) -> mqar.MQARTask:
    return mqar.MQARTask(seq_len=args.seq_len, n_filler=args.n_filler, n_keys=args.n_keys, n_values=args.n_values,
                         max_prefix=args.max_prefix)


def add_task_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--n-filler", type=int, default=64)
    ap.add_argument("--n-keys", type=int, default=512)
    ap.add_argument("--n-values", type=int, default=512)
    ap.add_argument("--max-prefix", type=int, default=64, help="filler before the pairs: uniform in [0, this]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train one model")
    add_task_args(tr)
    tr.add_argument("--out", required=True)
    tr.add_argument("--size", default="recall", choices=["recall", "recall-small"])
    tr.add_argument("--aggregation", default="grm", choices=["grm", "ssc", "none"])
    tr.add_argument("--segment-size", type=int, default=32)
    tr.add_argument("--top-k", type=int, default=4, help="stored in the config; used when served as ssc")
    tr.add_argument("--decay-init", default="slow", choices=list(DECAY_INITS))
    tr.add_argument("--steps", type=int, required=True)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument("--min-lr-ratio", type=float, default=0.1)
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--grad-clip", type=float, default=1.0)
    tr.add_argument("--min-pairs", type=int, default=4)
    tr.add_argument("--start-pairs", type=int, default=16, help="curriculum: the pair cap at step 0")
    tr.add_argument("--max-pairs", type=int, default=160)
    tr.add_argument("--ramp-frac", type=float, default=0.4, help="curriculum: fraction of steps to reach max-pairs")
    tr.add_argument("--log-every", type=int, default=25)
    tr.add_argument("--eval-every", type=int, default=250)
    tr.add_argument("--max-seconds", type=float, help="stop early past this many seconds (a safety net)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    add_step_args(tr)
    add_state_args(tr)
    ev = sub.add_parser("eval", help="evaluate trained models through the serving path")
    add_task_args(ev)
    ev.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    ev.add_argument("--variants", default="ssc,none", help="aggregations to also serve cache-reading models with")
    ev.add_argument("--pairs", default=",".join(map(str, EVAL_PAIRS)))
    ev.add_argument("--per-count", type=int, default=16, help="sequences per pair count")
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--out", required=True)
    ev.add_argument("--md")
    ev.add_argument("--plot")
    rp = sub.add_parser("report", help="tables and plot from an eval JSON (e.g. one made where matplotlib is missing)")
    rp.add_argument("results")
    rp.add_argument("--md")
    rp.add_argument("--plot")
    return ap.parse_args(argv)


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_of(args)
    device = pick_device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config(args.size, task.vocab_size, 0, args.aggregation, args.segment_size, args.top_k)
    model = init_model(cfg, args.seed, args.decay_init).to(device).train()
    graph = use_graph(args.cuda_graph, device)
    opt = make_optimizer(model, args.lr, args.weight_decay, device, capturable=graph)
    sched = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    cur = mqar.PairCurriculum(args.min_pairs, min(args.start_pairs, args.max_pairs), min(args.max_pairs,
                              task.max_pairs), round(args.steps * args.ramp_frac))
    rng = np.random.default_rng(args.seed)  # the batches: the same for every aggregation
    probe_pairs = sorted({min(n, task.max_pairs) for n in (8, cfg.head_dim, 4 * cfg.head_dim)})
    probe = mqar.eval_suite(task, probe_pairs, 4, args.seed + 1)
    settings = dict(vars(args), params=count_parameters(model), device=str(device), vocab_size=task.vocab_size,
                    head_dim=cfg.head_dim, config=cfg.to_dict())
    step, train_s = 0, 0.0  # steps done and training seconds before this process (a resumed run)
    if args.resume:
        step, extra = load_state(args.resume, model, opt, vars(args))
        rng.bit_generator.state = extra["rng"]
        train_s = extra["train_seconds"]
    log = (out / "log.jsonl").open("a" if args.resume else "w")

    def report(row: dict) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"{args.aggregation}: {row}", flush=True)

    check = args.graph_check if args.graph_check is not None else (8 if graph else 0)
    step_fn = TrainStep(model, opt, mqar_loss("torch", amp), args.grad_clip, 2, device, graph, check, report)
    log.write(json.dumps(dict(event="resume" if args.resume else "start", step=step, **settings)) + "\n")
    print(f"{args.aggregation}: {settings['params'] / 1e3:.0f}k parameters, decay init {args.decay_init}, "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} on {device}, "
          f"cuda graph {'on' if graph else 'off'}", flush=True)
    t0 = t_log = time.time()
    stopped_early = False
    n_log = 0
    while step < args.steps:
        counts = [cur.sample(rng, step) for _ in range(args.batch_size)]
        ids, tgt = (torch.from_numpy(a) for a in mqar.batch(task, rng, counts))
        step_fn(dict(inputs=ids, targets=tgt), sched.lr(step))
        step += 1
        n_log += 1
        if step % args.log_every == 0 or step == args.steps:
            (loss, acc), gnorm = step_fn.read()  # the one host sync of these steps
            now = time.time()
            row = dict(event="train", step=step, loss=loss, acc=acc, pair_cap=cur.cap(step), lr=sched.lr(step - 1),
                       grad_norm=gnorm, elapsed=train_s + now - t0, step_s=(now - t_log) / n_log, mode=step_fn.mode,
                       tok_per_s=n_log * args.batch_size * args.seq_len / max(now - t_log, 1e-9))
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"step {step}/{args.steps} loss {loss:.3f} acc {acc:.3f} cap {row['pair_cap']} "
                  f"{1 / row['step_s']:.2f} steps/s {row['tok_per_s'] / 1e3:.0f}k tok/s ({step_fn.mode}) "
                  f"{row['elapsed']:.0f}s", flush=True)
            n_log, t_log = 0, now
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            row = dict(event="eval", step=step, **probe_acc(model, probe, amp), elapsed=train_s + time.time() - t0)
            log.write(json.dumps(row) + "\n")
            print(f"[eval step {step}] " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("acc")),
                  flush=True)
            t_log += time.time() - t_eval  # the probe's time is not training throughput
        past = args.max_seconds is not None and time.time() - t0 > args.max_seconds
        if (past or step == args.pause_at) and step < args.steps:
            stopped_early = True
            print(f"stopping early at step {step}: " + (f"past {args.max_seconds:.0f}s" if past else "--pause-at"),
                  flush=True)
            break
    summary = dict(settings, steps_done=step, stopped_early=stopped_early, train_seconds=train_s + time.time() - t0,
                   step_mode=step_fn.mode)
    if stopped_early and args.save_state:
        save_state(args.save_state, model, opt, step, vars(args),
                   dict(rng=rng.bit_generator.state, train_seconds=summary["train_seconds"]))
        print(f"saved the state to continue from: --resume {args.save_state}", flush=True)
    elif args.save_state:
        Path(args.save_state).unlink(missing_ok=True)  # a finished run leaves nothing to resume
    save_checkpoint(model, out / "model", None, "fp32", summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.write(json.dumps(dict(event="done", steps_done=step, train_seconds=summary["train_seconds"])) + "\n")
    log.close()
    return summary


@torch.no_grad()
def probe_acc(model, probe: list[tuple[int, mqar.MQARSeq]], amp) -> dict:
    """Accuracy per pair count of the probe set with the batched forward (progress only)."""
    model.eval()
    ids = torch.from_numpy(np.stack([s.ids for _, s in probe])).to(model.device)
    with autocast_for(model.device, amp):
        lg = logits(model, hidden_states(model, ids, "torch"))
    model.train()
    out: dict[str, list[int]] = {}
    for r, (n, s) in enumerate(probe):
        pred = lg[r, torch.as_tensor(s.query_pos, device=model.device)].argmax(-1).cpu().numpy()
        h = out.setdefault(f"acc_{n}", [0, 0])
        h[0] += int((pred == s.answers).sum())
        h[1] += len(s.answers)
    return {k: h / c for k, (h, c) in out.items()}


def evaluate(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_of(args)
    device = pick_device(args.device)
    pairs = [int(x) for x in args.pairs.split(",")]
    suite = mqar.eval_suite(task, pairs, args.per_count, args.seed)
    edges = (0, *(2**i for i in range(4, max(5, math.ceil(math.log2(args.seq_len)) + 1))))  # 0, 16, 32, ..., >= T
    results: dict = dict(models={}, settings=dict(n_pairs=pairs, per_count=args.per_count, seed=args.seed,
                                                  seq_len=args.seq_len, device=str(device)))
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        if not model_dir:
            raise SystemExit(f"--model wants NAME=DIR, got {spec!r}")
        own = load_model(model_dir, dtype="float32", device=device)
        results["settings"]["head_dim"] = own.cfg.head_dim
        served = [(name, None)] + [(f"{name}-as-{v}", v) for v in args.variants.split(",")
                                   if v and own.spec.reads_cache and v != own.spec.aggregation]
        for label, agg in served:
            t0 = time.time()
            model = own if agg is None else load_model(model_dir, dtype="float32", device=device, aggregation=agg)
            training = json.loads((Path(model_dir) / "training.json").read_text())
            results["models"][label] = dict(
                dir=str(model_dir), served_aggregation=model.spec.aggregation, top_k=model.spec.top_k,
                segment_size=model.spec.segment_size, params=count_parameters(model),
                training={k: training.get(k) for k in ("aggregation", "steps_done", "batch_size", "lr", "decay_init",
                                                       "train_seconds", "device")},
                recall=mqar_eval.accuracy(model, suite, edges), eval_seconds=time.time() - t0)
            r = results["models"][label]["recall"]
            print(f"{label}: " + " ".join(f"{n}:{100 * a:.1f}" for n, a in zip(r["n_pairs"], r["by_pairs"],
                                                                              strict=True))
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return report(results, args.md, args.plot)


def report(results: dict, md: str | None, plot: str | None) -> dict:
    table = mqar_eval.markdown(results)
    print(table)
    if md:
        Path(md).write_text(table)
    seg = next(iter(results["models"].values()))["segment_size"]
    title = f"MQAR recall through the serving path (T = {results['settings']['seq_len']}, segment {seg})"
    if plot and not mqar_eval.plot(results, plot, title):
        print("matplotlib is not installed: no plot")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cmd == "report":
        return report(json.loads(Path(args.results).read_text()), args.md, args.plot)
    return train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    main()
