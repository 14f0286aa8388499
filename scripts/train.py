"""Train a Gated DeltaNet + Memory Caching LM from scratch and save it in the serving format.

    # once, on a machine with the corpus (../shared/data/build_corpus.sh):
    python scripts/train_tokenizer.py --corpus /tmp/corpus --out .train_data/tokenizer
    python scripts/train.py --corpus /tmp/corpus --data-dir .train_data --prepare-only
    # train (GPU: fla's chunk kernel + bf16 autocast; CPU: the torch core in fp32):
    python scripts/train.py --data-dir .train_data --out runs/ssc --aggregation ssc --time-budget 400
    python scripts/train.py --data-dir .train_data --out runs/none --aggregation none --steps 5000

Writes OUT/model/ (the serving checkpoint, `mcserve serve OUT/model`), OUT/log.jsonl (one line per
logged step and per evaluation) and OUT/summary.json. With --time-budget the number of steps is
fixed after a short throughput probe, and the cosine schedule spans exactly those steps, so a second
model trained with `--steps <summary.steps>` gets the same schedule and the same batches (unless
--replan lengthened it). See scripts/mctrain/train_step.py for the step (CUDA graph) and
scripts/mctrain/train_state.py for --save-state / --resume.
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
from mctrain.batches import BatchSampler  # noqa: E402
from mctrain.chat_data import CHAT_META, ChatData  # noqa: E402
from mctrain.checkpoint import (  # noqa: E402
    DECAY_INITS,
    MODEL_SIZES,
    count_parameters,
    init_model,
    save_checkpoint,
    train_config,
)
from mctrain.corpus import EOT, KV_TOKEN, QUERY_TOKEN, read_corpus  # noqa: E402
from mctrain.evaluation import (  # noqa: E402
    heldout_nll,
    masked_nll,
    quick_recall_acc,
    repeat_gain,
    repeat_windows,
    token_bytes,
)
from mctrain.fla_backward import FLA_BACKWARDS, use_fla_backward  # noqa: E402
from mctrain.mc_forward import check_backend, default_backend  # noqa: E402
from mctrain.recall import RecallTask  # noqa: E402
from mctrain.repeat import RepeatTask  # noqa: E402
from mctrain.schedule import CosineSchedule, plan_total_steps  # noqa: E402
from mctrain.token_data import META_FILE, TokenData, build_token_data  # noqa: E402
from mctrain.train_state import add_state_args, load_state, save_state  # noqa: E402
from mctrain.train_step import TrainStep, add_step_args, lm_loss, make_optimizer, use_graph  # noqa: E402

from mcserve.kernels.mc_spec import AGGREGATIONS, STATE_INITS, MCSpec  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # the GPU image has no tqdm: fall back to a line every --log-every steps
    tqdm = None

# steps timed to plan a --time-budget run: after autotuning, and after the CUDA graph is in place
# (train_step.WARMUP + the default --graph-check of 8 steps)
PROBE_START, PROBE_END = 20, 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="tokenizer/ + train.npy + heldout.npy + meta.json")
    ap.add_argument("--corpus", help="folder of *.txt: tokenise it into --data-dir if that has no arrays yet")
    ap.add_argument("--prepare-only", action="store_true", help="build the data folder and exit")
    ap.add_argument("--out", help="run folder: model/, log.jsonl, summary.json")
    ap.add_argument("--size", default="default", choices=list(MODEL_SIZES))
    ap.add_argument("--aggregation", default="ssc", choices=list(AGGREGATIONS))
    ap.add_argument("--segment-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--state-init", default="continue", choices=list(STATE_INITS))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--time-budget", type=float, help="seconds of training; steps are planned from a probe")
    ap.add_argument("--replan", action="store_true", help="with --time-budget: lengthen the planned run in the "
                    "budget's first half if steps got faster (a shared card freed); the schedule then differs "
                    "from a --steps run of the same length")
    ap.add_argument("--max-seconds", type=float, help="stop early past this many seconds of training (a safety net)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--recall-frac", type=float, default=0.2, help="fraction of each batch that is MQAR")
    ap.add_argument("--recall-max-pairs", type=int, default=64)
    ap.add_argument("--recall-weight", type=float, default=1.0)
    ap.add_argument("--chat-frac", type=float, default=0.0, help="fraction of each batch that is chat windows "
                    "(needs the chat arrays of scripts/build_chat_data.py in --data-dir)")
    ap.add_argument("--repeat-frac", type=float, default=0.0, help="fraction of each batch that is text with a "
                    "span written twice (mctrain.repeat: teaches copying from the context and reading the cache)")
    ap.add_argument("--repeat-max-span", type=int, default=480, help="longest repeated span, tokens")
    ap.add_argument("--init-from", help="a serving checkpoint (e.g. server/data/default_model) to start from "
                    "instead of fresh weights: same config shapes and the same tokenizer as --data-dir, else an "
                    "error; the optimizer and schedule start fresh")
    ap.add_argument("--decay-init", default="fla", choices=list(DECAY_INITS), help="how A_log and dt_bias start "
                    "(mctrain.checkpoint.DECAY_INITS)")
    ap.add_argument("--evals", type=int, default=8, help="held-out evaluations over the run (and at the end)")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out windows per source per evaluation")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "fla"])
    ap.add_argument("--fla-backward", default="ours", choices=list(FLA_BACKWARDS), help="where fla refuses its "
                    "gated chunk backward (fla #640: Hopper + Triton < 3.7.1): `ours` runs mctrain.fla_backward's "
                    "chunk_bwd_dqkwg in its place, `lifted` lifts fla's guard (its own kernel); either only if "
                    "it then passes the check against the torch core")
    ap.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp32"])
    add_step_args(ap)
    add_state_args(ap)
    args = ap.parse_args(argv)
    if not args.prepare_only and (args.out is None or (args.steps is None and args.time_budget is None)):
        ap.error("training needs --out and one of --steps / --time-budget")
    return args


def prepare_data(args: argparse.Namespace) -> TokenData:
    root = Path(args.data_dir)
    if not (root / META_FILE).is_file():
        if not args.corpus:
            raise SystemExit(f"{root} has no {META_FILE}; pass --corpus to tokenise a corpus into it")
        t0 = time.time()
        meta = build_token_data(read_corpus(args.corpus), root)
        total = sum(s["train"][1] for s in meta["sources"])
        held = sum(s["heldout"][1] for s in meta["sources"])
        print(f"tokenised {args.corpus}: {total} training + {held} held-out tokens in {time.time() - t0:.0f}s")
    return TokenData.load(root)


class Logger:
    def __init__(self, path: Path, append: bool = False) -> None:
        self.file = path.open("a" if append else "w")

    def write(self, **row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def pick_backend(choice: str, device: torch.device, args: argparse.Namespace) -> tuple[str, str]:
    """`auto` on CUDA is fla's kernel if it agrees with the torch core on random inputs at this model's
    head shapes and segment (outputs and gradients, bf16 tolerance), else the torch core, so that a
    broken install costs speed, not the run. Where fla refuses its own backward (#640), --fla-backward
    picks what runs in its place first (mctrain.fla_backward), and the check proves that combination.
    Returns (backend, what runs, in words)."""
    backend = default_backend(device) if choice == "auto" else choice
    if backend != "fla":
        return backend, "torch core"
    spec = MCSpec(args.aggregation, args.segment_size, args.top_k, args.state_init)
    size = MODEL_SIZES[args.size]
    hv = size.get("num_v_heads") or size["num_heads"]
    how = "fla"
    try:
        how = use_fla_backward(args.fla_backward)
        err = check_backend("fla", spec, size["num_heads"], hv, size["head_dim"],
                            round(size["head_dim"] * size["expand_v"]), device)
    except Exception as e:  # noqa: BLE001 - any failure of the optional kernel means: use the torch core
        err = dict(error=f"{type(e).__name__}: {e}")
    ok = "error" not in err and err["out"] < 3e-2 and err["grad"] < 6e-2
    print(f"fla core check vs torch core ({how}): {err} -> {'fla' if ok else 'torch (fallback)'}", flush=True)
    if not ok and choice == "fla":
        raise SystemExit("--backend fla was asked for but fails the check")
    return ("fla", how) if ok else ("torch", f"torch core (fallback: {how} failed the check)")


def load_weights(model: torch.nn.Module, src: Path, tokenizer_dir: Path) -> None:
    """Start `model` from the serving checkpoint `src`: the same tensors by name and shape (an error
    names any that differ) and a tokenizer identical to the training data's."""
    from mcserve.server.model.loader import load_model

    mine, theirs = tokenizer_dir / "tokenizer.json", src / "tokenizer.json"
    if not theirs.is_file() or theirs.read_bytes() != mine.read_bytes():
        raise SystemExit(f"--init-from {src}: its tokenizer.json is not the one of the training data ({mine})")
    state = load_model(src, dtype="float32", device="cpu").state_dict()
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [n for n in own if n in state and own[n].shape != state[n].shape]
    if bad:
        raise SystemExit(f"--init-from {src}: tensors differ from this model's config: {bad[:8]}")
    model.load_state_dict(state)
    print(f"started from the weights of {src}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = prepare_data(args)
    if args.prepare_only:
        return {}
    import tokenizers

    t_start = time.time()  # the budget covers the kernel check and autotuning too
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    backend, core = pick_backend(args.backend, device, args)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = tokenizers.Tokenizer.from_file(str(data.tokenizer_dir / "tokenizer.json"))
    task = RecallTask(data.vocab_size, tok.token_to_id(KV_TOKEN), tok.token_to_id(QUERY_TOKEN))
    cfg = train_config(args.size, data.vocab_size, tok.token_to_id(EOT), args.aggregation, args.segment_size,
                       args.top_k, args.state_init)
    model = init_model(cfg, args.seed, args.decay_init)
    if args.init_from:
        load_weights(model, Path(args.init_from), data.tokenizer_dir)
    model.to(device).train()
    n_params = count_parameters(model)
    graph = use_graph(args.cuda_graph, device)
    opt = make_optimizer(model, args.lr, args.weight_decay, device, capturable=graph)
    chat = ChatData.load(args.data_dir) if args.chat_frac > 0 or (Path(args.data_dir) / CHAT_META).is_file() else None
    repeat = RepeatTask(max_span=args.repeat_max_span)
    sampler = BatchSampler(data, task, args.batch_size, args.seq_len, args.recall_frac, args.recall_max_pairs,
                           args.seed, chat, args.chat_frac, args.repeat_frac, repeat)
    eval_windows = data.heldout_windows(args.seq_len + 1, args.eval_windows)
    chat_windows = chat.heldout_windows(args.seq_len + 1)[: 4 * args.eval_windows] if chat is not None else []
    bytes_of = token_bytes(tok)
    rng = np.random.default_rng(args.seed + 1)
    held = data.heldout
    fits = [n for n in (4, 16, 64) if 24 + task.length_needed(n, n) <= args.seq_len] or [1]
    eval_recall = [task.make(rng, held[s:s + args.seq_len].astype(np.int64), n,
                             args.seq_len - 24 - task.length_needed(n, n), 16)
                   for n in fits for s in rng.integers(0, len(held) - args.seq_len, 8)]
    eval_repeat = repeat_windows(repeat, held, args.seq_len + 1, 8)  # `none` models: a gain of 0
    # a 32-token span repeated 32 tokens later: its second copy's loss falls far below text's once the
    # model copies from its context at all (the online state suffices at this distance)
    eval_copy = repeat_windows(RepeatTask(max_span=32), held, args.seq_len + 1, 8)
    log = Logger(out / "log.jsonl", append=bool(args.resume))

    def report(row: dict) -> None:
        log.write(**row)
        print(f"\n{row}", flush=True)

    check = args.graph_check if args.graph_check is not None else (8 if graph else 0)
    step_fn = TrainStep(model, opt, lm_loss(backend, amp, args.recall_weight, sampler.chat_rows), args.grad_clip, 4,
                        device, graph, check, report)
    settings = dict(vars(args), params=n_params, device=str(device), backend=backend, core=core,
                    gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    tokens_per_step=args.batch_size * args.seq_len)
    log.write(event="resume" if args.resume else "start", **settings)
    print(f"{args.aggregation}: {n_params / 1e6:.2f}M parameters on {settings['gpu'] or device} ({core}, "
          f"cuda graph {'on' if graph else 'off'})")

    total = args.steps if args.steps is not None else 10**9  # a --time-budget run plans it at PROBE_END
    step, done_s, planned = 0, 0.0, args.steps is not None  # steps and seconds before this process (--resume)
    if args.resume:
        step, extra = load_state(args.resume, model, opt, vars(args))
        sampler.rng.bit_generator.state = extra["rng"]
        total, done_s, planned = extra["total"], extra["train_seconds"], extra["planned"]
    sched = CosineSchedule(args.lr, args.warmup, total, args.min_lr_ratio)
    eval_every = max(1, total // max(args.evals, 1)) if planned else None
    replan = args.replan and args.time_budget is not None and not args.resume
    bar = tqdm(total=args.steps, dynamic_ncols=True, mininterval=2.0) if tqdm else None
    last_eval: dict = {}

    def evaluate(step: int) -> dict:
        model.eval()
        t0 = time.time()
        res = heldout_nll(model, eval_windows, bytes_of, autocast_dtype=amp, backend=backend)
        acc = quick_recall_acc(model, eval_recall, autocast_dtype=amp, backend=backend)
        chat_loss = (masked_nll(model, chat_windows, autocast_dtype=amp, backend=backend)["loss"] if chat_windows
                     else None)
        rep = repeat_gain(model, eval_repeat, autocast_dtype=amp, backend=backend)
        copy32 = masked_nll(model, eval_copy, autocast_dtype=amp, backend=backend)["loss"]
        model.train()
        row = dict(event="eval", step=step, heldout_loss=res["loss"], heldout_ppl=res["ppl"], heldout_bpb=res["bpb"],
                   recall_acc=acc, chat_heldout_loss=chat_loss, repeat=rep, copy32_loss=copy32, eval_s=time.time() - t0,
                   elapsed=time.time() - t_start)
        log.write(**row)
        chat_txt = "" if chat_loss is None else f" chat ppl {math.exp(chat_loss):.2f}"
        rep_txt = f" copy32 nll {copy32:.3f} repeat copy nll {rep['own']:.3f} (as none {rep['none']:.3f})"
        print(f"\n[eval step {step}] held-out ppl {res['ppl']:.2f} bpb {res['bpb']:.3f} recall {acc:.3f}{chat_txt}"
              f"{rep_txt}", flush=True)
        return row

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    max_seconds = args.max_seconds
    if max_seconds is None and args.time_budget is not None:
        max_seconds = args.time_budget * 1.1 + 10
    stopped_early, step_time = False, None
    n_sums = 0
    t_probe = t_log = time.time()
    while step < total:
        batch = sampler.next()
        step_fn(dict(inputs=batch.inputs, targets=batch.targets, lm_mask=batch.lm_mask,
                     recall_mask=batch.recall_mask), sched.lr(step))
        n_sums += 1
        step += 1

        if not planned and step in (PROBE_START, PROBE_END):
            sync()
            if step == PROBE_START:
                t_probe = time.time()
            else:
                step_time = (time.time() - t_probe) / (PROBE_END - PROBE_START)
                total = plan_total_steps(step, time.time() - t_start, step_time, args.time_budget, min_steps=step)
                planned = True
                sched = CosineSchedule(args.lr, args.warmup, total, args.min_lr_ratio)
                eval_every = max(1, total // max(args.evals, 1))
                log.write(event="plan", step=step, step_time=step_time, total_steps=total,
                          elapsed=time.time() - t_start)
                print(f"\nplanned {total} steps at {step_time * 1e3:.0f} ms/step "
                      f"({args.batch_size * args.seq_len / step_time / 1e3:.0f}k tokens/s)", flush=True)
                if bar is not None:
                    bar.total = total
        if step % args.log_every == 0 or step == total:
            (lm, rc, ra, cl), gnorm = step_fn.read()  # the one host sync of these steps
            now = time.time()
            row = dict(event="train", step=step, lr=sched.lr(step - 1), lm_loss=lm, recall_loss=rc, recall_acc=ra,
                       chat_loss=cl, grad_norm=gnorm, tokens=step * args.batch_size * args.seq_len,
                       elapsed=now - t_start, steps_per_s=n_sums / max(now - t_log, 1e-9), mode=step_fn.mode,
                       tok_per_s=n_sums * args.batch_size * args.seq_len / max(now - t_log, 1e-9))
            log.write(**row)
            if replan and planned and step > PROBE_END and now - t_start < args.time_budget / 2:
                # the card got faster (e.g. the runs sharing it ended): stretch the schedule while in
                # the first half of the budget; never shrink it (--max-seconds guards the other way)
                more = plan_total_steps(step, now - t_start, 1 / row["steps_per_s"], args.time_budget, min_steps=step)
                if more > total * 1.05:
                    log.write(event="plan", step=step, step_time=1 / row["steps_per_s"], total_steps=more,
                              elapsed=now - t_start, replanned_from=total)
                    print(f"\nre-planned {total} -> {more} steps at {1e3 / row['steps_per_s']:.0f} ms/step", flush=True)
                    total = more
                    sched = CosineSchedule(args.lr, args.warmup, total, args.min_lr_ratio)
                    eval_every = max(1, total // max(args.evals, 1))
                    if bar is not None:
                        bar.total = total
            n_sums, t_log = 0, now
            if bar is not None:
                bar.set_postfix(lm=f"{lm:.3f}", recall=f"{ra:.2f}", lr=f"{row['lr']:.1e}", refresh=False)
            else:
                print(f"step {step}/{total if total < 10**9 else '?'} lm {lm:.3f} chat {cl:.3f} recall {rc:.3f} "
                      f"acc {ra:.2f} lr {row['lr']:.2e} {row['steps_per_s']:.2f} steps/s "
                      f"{row['tok_per_s'] / 1e3:.0f}k tok/s ({step_fn.mode}) {row['elapsed']:.0f}s", flush=True)
            if not math.isfinite(lm):
                raise SystemExit(f"loss is {lm} at step {step}; stopping")
        if bar is not None:
            bar.update(1)
        if eval_every is not None and step % eval_every == 0 and step < total:
            last_eval = evaluate(step)
            save_checkpoint(model, out / "model", data.tokenizer_dir, args.save_dtype,
                            dict(settings, steps_done=step, partial=True))
        past = max_seconds is not None and time.time() - t_start > max_seconds
        if (past or step == args.pause_at) and step < total:
            stopped_early = True  # the probe misjudged, or this model is slower: keep the GPU job in its limit
            print(f"\nstopping early at step {step}: " + (f"past {max_seconds:.0f}s" if past else "--pause-at"),
                  flush=True)
            break
    if bar is not None:
        bar.close()
    sync()
    train_s = done_s + time.time() - t_start
    if stopped_early and args.save_state:
        save_state(args.save_state, model, opt, step, vars(args),
                   dict(rng=sampler.rng.bit_generator.state, total=total, planned=planned, train_seconds=train_s))
        print(f"saved the state to continue from: --resume {args.save_state}", flush=True)
    elif args.save_state:
        Path(args.save_state).unlink(missing_ok=True)  # a finished run leaves nothing to resume
    last_eval = evaluate(step)
    summary = dict(settings, steps=step, planned_steps=total, stopped_early=stopped_early, train_seconds=train_s,
                   step_time=step_time, tokens=step * args.batch_size * args.seq_len, final_eval=last_eval)
    save_checkpoint(model, out / "model", data.tokenizer_dir, args.save_dtype, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.write(event="done", **{k: v for k, v in summary.items() if k not in settings})
    print(f"done: {step} steps in {train_s:.0f}s; held-out ppl {last_eval['heldout_ppl']:.2f}; wrote {out / 'model'}")
    return summary


if __name__ == "__main__":
    main()
