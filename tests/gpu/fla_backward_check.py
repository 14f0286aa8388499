"""fla's gated chunk backward on Hopper + Triton < 3.7.1 (fla #640): what is right, and how fast it trains.

    bash tests/gpu/run_on_device.sh python3 tests/gpu/fla_backward_check.py --out $OUT/fb.json   # carry .whl

(.whl: the fla-core / flash-linear-attention 0.6 wheels and einops, which fla.ops imports.) Rows run
in the order 1, 2 (chat), 3, 2 (the other shapes), 4; each prints one line with its seconds, the JSON
is rewritten after every row, and a row that would end past --budget-s by its estimate is skipped and
listed under `skipped`:
1. `check` at the chat model's shapes (train.py's chat job: size default, ssc, segment 64):
   mc_forward.check_backend (mc_core on fla under bf16 autocast vs the fp32 torch core, outputs and
   per-input gradients, as pick_backend runs it) with fla's guard lifted (`lifted`: its own kernel)
   and with our replacement (`ours`). pick_backend's bar: out < 3e-2 and grad < 6e-2.
2. `kernel`: fla's chunk_bwd_dqkwg alone, guard lifted, on random bf16 inputs, against our
   replacement in fp64 (which equals fla's kernel under the Triton interpreter to ~1e-7), per output
   (dq, dk, dw, dg), with fla's block widths BK and BV: at the two models' head shapes and at
   K = V = 32, 64, 128 (the #640 sweep's block widths); `ours` in bf16 beside it.
3. `train`: training-step throughput (mctrain.train_step.TrainStep as train.py runs it: eager warmup,
   an eager-vs-graph check, then the CUDA graph) at the chat model's size, batch and length: the torch
   core, fla + ours, and fla lifted where its row-1 check passed.
4. `check` at the recall model's shapes (size recall, grm, segment 32), then at head dims 32, 64, 128
   (4 heads, dv = dk, ssc, segment 64).
Row 1's first call compiles and autotunes fla's kernels for that shape (~1-2 min on a fresh machine);
`--rows` picks rows for a second command, e.g. `--rows recall,dk32,dk64,dk128`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from mctrain.checkpoint import MODEL_SIZES, init_model, train_config  # noqa: E402
from mctrain.fla_backward import chunk_bwd_dqkwg_torch, use_fla_backward  # noqa: E402
from mctrain.mc_forward import check_backend  # noqa: E402
from mctrain.train_step import WARMUP, TrainStep, lm_loss, make_optimizer  # noqa: E402

from mcserve.kernels.mc_spec import MCSpec  # noqa: E402

OUT_LIMIT, GRAD_LIMIT = 3e-2, 6e-2  # scripts/train.py pick_backend's bar
TIMED_CALLS = 20
# a row starts only if this many more seconds stay within --budget-s: a guess for a shape fla has not
# compiled yet (check), a dqkwg autotune (kernel), and ~13 steps at the torch core's 1.6 s (train)
ROW_ESTIMATE_S = {"check": 20.0, "kernel": 8.0, "train": 40.0}


def model_shape(size: str) -> tuple[int, int, int, int]:
    s = MODEL_SIZES[size]
    return s["num_heads"], s.get("num_v_heads") or s["num_heads"], s["head_dim"], round(s["head_dim"] * s["expand_v"])


# name: (H, HV, K, V, spec)
CHECKS = {
    "chat": (*model_shape("default"), MCSpec("ssc", 64, 2, "continue")),
    "recall": (*model_shape("recall"), MCSpec("grm", 32, 2, "continue")),
    **{f"dk{d}": (4, 4, d, d, MCSpec("ssc", 64, 2, "continue")) for d in (32, 64, 128)},
}
KERNEL_SHAPES = {"chat": model_shape("default"), "recall": model_shape("recall"),
                 **{f"dk{d}": (4, 4, d, d) for d in (32, 64, 128)}}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_row(name: str, mode: str, dev: torch.device) -> dict:
    H, HV, K, V, spec = CHECKS[name]
    how = use_fla_backward(mode)
    row = dict(row="check", case=name, mode=mode, how=how, H=H, HV=HV, K=K, V=V, aggregation=spec.aggregation,
               segment=spec.segment_size)
    try:
        err = check_backend("fla", spec, H, HV, K, V, dev)
        row.update(err, passes=err["out"] < OUT_LIMIT and err["grad"] < GRAD_LIMIT)
    except Exception as e:  # noqa: BLE001 - a failing kernel is a result here
        row.update(error=f"{type(e).__name__}: {e}", passes=False)
    return row


def block_widths(K: int, V: int) -> tuple[int, int]:
    """fla 0.6 chunk_bwd_dqkwg's BK, BV on Hopper (CONST_TILING 128)."""
    import triton

    return tuple(min(max(triton.next_power_of_2(d), 16), 128) for d in (K, V))


def kernel_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, L: int, dev: torch.device) -> dict:
    """Random chunk_bwd_dqkwg inputs in the training path's dtypes and layout (state_v_first)."""
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=dev)

    nt = -(-T // L)
    q, k = (torch.nn.functional.normalize(rand(B, T, H, K), dim=-1) for _ in range(2))
    step = -torch.nn.functional.softplus(rand(B, nt * L, HV)) * 0.05
    g = step.view(B, nt, L, HV).cumsum(2).view(B, nt * L, HV)[:, :T] / 0.6931471805599453  # log2 units
    bf = {n: x.bfloat16() for n, x in dict(q=q, k=k, v=rand(B, T, HV, V), do=rand(B, T, HV, V),
                                           h=rand(B, nt, HV, V, K), dh=rand(B, nt, HV, V, K) * 0.1,
                                           w=rand(B, T, HV, K) * 0.1, dv=rand(B, T, HV, V)).items()}
    return dict(bf, g=g.contiguous(), scale=K**-0.5, state_v_first=True, chunk_size=L)


def kernel_row(name: str, dev: torch.device) -> dict:
    from fla.ops.common import chunk_o

    H, HV, K, V = KERNEL_SHAPES[name]
    BK, BV = block_widths(K, V)
    row = dict(row="kernel", case=name, H=H, HV=HV, K=K, V=V, BK=BK, BV=BV)
    kw = kernel_inputs(16, 250, H, HV, K, V, 64, dev)  # 250: a partial last chunk
    truth = chunk_bwd_dqkwg_torch(**{n: x.double() if torch.is_tensor(x) else x for n, x in kw.items()})
    names = ("dq", "dk", "dw", "dg")
    ours = chunk_bwd_dqkwg_torch(**kw)
    row["ours_bf16"] = {n: rel(a, b) for n, a, b in zip(names, ours, truth, strict=True)}
    use_fla_backward("lifted")
    fns = {"ours": chunk_bwd_dqkwg_torch}
    try:
        lifted = chunk_o.chunk_bwd_dqkwg(**kw)
        row["lifted"] = {n: rel(a, b) for n, a, b in zip(names, lifted, truth, strict=True)}
        # bf16 rounding is ~1e-2 at most here; a miscompile is off by O(1) (#640: dk max error 14.65)
        row["lifted_ok"] = all(e < 5e-2 for e in row["lifted"].values())
        fns["lifted"] = chunk_o.chunk_bwd_dqkwg
    except Exception as e:  # noqa: BLE001 - a failing kernel is a result here
        row.update(lifted_error=f"{type(e).__name__}: {e}", lifted_ok=False)
    for label, fn in fns.items():
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(TIMED_CALLS):
            fn(**kw)
        sync(dev)
        row[f"{label}_ms"] = (time.perf_counter() - t0) / TIMED_CALLS * 1e3
    return row


def train_row(backend: str, mode: str | None, args: argparse.Namespace, dev: torch.device) -> dict:
    how = use_fla_backward(mode) if mode else "torch core"
    B, T, vocab = args.batch, args.seq_len, args.vocab
    row = dict(row="train", backend=backend, mode=mode, how=how, size="default", batch=B, seq_len=T, vocab=vocab,
               aggregation="ssc", segment=64)
    cfg = train_config("default", vocab, 0, "ssc", 64, 2)
    model = init_model(cfg, 0, "slow").to(dev).train()
    opt = make_optimizer(model, 1e-3, 0.1, dev, capturable=True)
    events: list[dict] = []
    step = TrainStep(model, opt, lm_loss(backend, torch.bfloat16, 1.0, slice(0, B // 2)), 1.0, 4, dev, True, 2,
                     events.append)
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        ids = torch.randint(0, vocab, (B, T + 1), generator=gen)
        return dict(inputs=ids[:, :-1].contiguous(), targets=ids[:, 1:].contiguous(), lm_mask=torch.ones(B, T),
                    recall_mask=torch.zeros(B, T))

    torch.cuda.reset_peak_memory_stats(dev)
    try:
        for _ in range(WARMUP + 2 + 1):  # eager warmup, the eager-vs-graph check, the first graph step
            step(batch(), 1e-3)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(batch(), 1e-3)
        sync(dev)
        dt = (time.perf_counter() - t0) / args.steps
        (lm, *_), gnorm = step.read()
        row.update(step_s=dt, tok_per_s=B * T / dt, mode_after=step.mode, loss=lm, grad_norm=gnorm,
                   peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                   graph=[{k: v for k, v in e.items() if k in ("event", "ok", "max_rel_diff", "reason")}
                          for e in events])
    except Exception as e:  # noqa: BLE001
        row.update(error=f"{type(e).__name__}: {e}")
    del step, opt, model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="start no row that would, by its estimate (ROW_ESTIMATE_S), end after this many seconds")
    ap.add_argument("--rows", default="chat,kernel,train,recall,dk32,dk64,dk128")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per backend")
    args = ap.parse_args()
    t_start = time.time()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    import fla
    import triton
    from fla.ops.common import chunk_o

    refuses = bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1)
    res = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
               fla=getattr(fla, "__version__", "?"), fla_refuses=refuses, rows=[], skipped=[])
    print({k: v for k, v in res.items() if k not in ("rows", "skipped")}, flush=True)

    def run(label: str, fn, *a) -> dict | None:
        elapsed = time.time() - t_start
        if elapsed + ROW_ESTIMATE_S[label.split()[0]] > args.budget_s:
            res["skipped"].append(label)
            print(f"skipped {label}: {elapsed:.0f}s in, past --budget-s by its estimate", flush=True)
            return None
        t0 = time.time()
        row = fn(*a)
        row["seconds"] = time.time() - t0
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        return row

    wanted = args.rows.split(",")
    lifted_ok = False
    # the chat model first (what training needs), its throughput before the other shapes
    if "chat" in wanted:
        for mode in ("lifted", "ours"):
            row = run(f"check chat {mode}", check_row, "chat", mode, dev)
            lifted_ok |= row is not None and mode == "lifted" and row["passes"]
    if "kernel" in wanted:
        run("kernel chat", kernel_row, "chat", dev)
    if "train" in wanted:
        run("train torch", train_row, "torch", None, args, dev)
        run("train fla+ours", train_row, "fla", "ours", args, dev)
        if lifted_ok:
            run("train fla+lifted", train_row, "fla", "lifted", args, dev)
    if "kernel" in wanted:
        for name in [n for n in KERNEL_SHAPES if n != "chat"]:
            run(f"kernel {name}", kernel_row, name, dev)
    for name in ("recall", "dk32", "dk64", "dk128"):
        if name in wanted:
            for mode in ("lifted", "ours"):
                run(f"check {name} {mode}", check_row, name, mode, dev)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"done in {time.time() - t_start:.0f}s; skipped: {res['skipped']}", flush=True)


if __name__ == "__main__":
    main()
