"""Launch-config sweep of the Triton decode step on one card -> its config table (kernels/decode/tuning.py).

    bash tests/gpu/run_on_device.sh python3 benchmarks/kernel_sweep.py --out $OUT/h200.json    # H200, ~150 s
    python benchmarks/kernel_sweep.py --smoke --out /tmp/sweep/table.json                     # CPU, interpreter
    # part of the grid, beside fla, merged into the committed table (the small-batch k=0 question, ~2 min):
    bash tests/gpu/run_on_device.sh python3 benchmarks/kernel_sweep.py --batches 1,8,32,64 --kinds none --fla \
        --merge kernels/decode/configs/h200.json --out $OUT/h200.json --budget-s 150

For each shape (kernel_cells.SHAPES), kind (none, residual, ssc k = 2 / 4 / 8 over 64 cached, grm over
64) and batch size (1 .. 512), every candidate config (`candidates`: tile height x warps, tiles per
program, v-heads per program where HV > H, one- vs two-pass routing, grm's pipeline depth; with
--variants new or all also the prefetching prologue and, at small B * HV, tiles of 256-512 elements)
is timed per call under CUDA-graph replay (kernel_cells.Cells.mc); the fastest becomes the table's
entry for (shape class, kind, B * HV). First every candidate is compiled by worker processes in parallel (a compile
takes seconds; they fill Triton's on-disk cache, from which this process then loads). Batch sizes run
in priority order and no new cell starts after --budget-s; an entry is written only for a (shape, kind,
B) whose candidates were all timed (the lookup takes the next swept batch instead). --batches, --kinds
and --shapes sweep part of the grid; --merge TABLE keeps TABLE's entries the sweep did not redo (so the
output is a whole table again); --fla times fla's step beside kind none. Writes the table to --out, and
every measurement to kernel_sweep.json / kernel_sweep.md beside it (with, per swept cell, the best of the
old candidates, of the new ones, and fla).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import torch

BATCHES = [64, 256, 512, 1, 128, 32, 8]  # priority order: what the targets judge, then what the engine runs
KINDS = {"none": ("none", 0), "residual": ("residual", 0), "ssc2": ("ssc", 2), "ssc4": ("ssc", 4),
         "ssc8": ("ssc", 8), "grm": ("grm", 0)}
CACHED = 64
GRM_MAX_BATCH = 256  # grm at B=512 reads 64 checkpoints per row (12 ms at shape b); it takes B=256's entry
SMOKE = dict(batches=[3, 1], kinds=["none", "ssc2"], cached=3, pool_bytes=1 << 20)
SMALL_PAIRS = 1024  # B * HV up to which the small tiles are tried (B <= 64 at shape a)


def candidates(s: dict, kind: str, smoke: bool = False, B: int | None = None, variants: str = "old"):
    """The configs tried for one shape, kind and batch: `variants` old (`base_candidates`), new
    (`new_candidates` at B) or all (both, old first). Smoke: the first and the last."""
    old = base_candidates(s, kind) if variants in ("old", "all") else []
    new = new_candidates(s, kind, B, base_candidates(s, kind)) if variants in ("new", "all") else []
    out = list(dict.fromkeys(old + new))
    return out[:1] + out[-1:] if smoke else out


def new_candidates(s: dict, kind: str, B: int, base: list) -> list:
    """What the sweep tries beyond `base_candidates`: each of them with the prefetching prologue
    (KernelConfig.prefetch); at B * HV <= SMALL_PAIRS (a grid of a few hundred programs), tiles of 256
    and 512 fp32 elements at one warp (8-16 per thread: more programs, each with less to serialise),
    with and without prefetch (two-pass for the routed kinds)."""
    from mcserve.kernels.decode.tuning import KernelConfig  # noqa: PLC0415 (after the interpreter flag)

    bk = 1 << (s["dk"] - 1).bit_length()
    out = [dataclasses.replace(c, prefetch=True) for c in base]
    if B * s["HV"] <= SMALL_PAIRS:
        for bv in (256 // bk, 512 // bk):
            if bv >= 1:
                out += [KernelConfig(bv, 1, two_pass=kind not in ("none", "residual"), prefetch=pf)
                        for pf in (False, True)]
    return list(dict.fromkeys(c for c in out if c not in base))


def base_candidates(s: dict, kind: str) -> list:
    """The configs tried for one shape and kind. Tiles of 1-4K fp32 elements at 32-128 per thread (64
    registers' worth is where the old sweep's winners sat); more tiles per program (online: 2; routed
    one-pass: up to 8, so that a program routes once for much of its v-head); all G v-heads of a q/k head
    per program where HV > H; grm two-pass at pipeline depth 2 and 3."""
    from mcserve.kernels.decode.tuning import KernelConfig  # noqa: PLC0415 (after the interpreter flag)

    bk = 1 << (s["dk"] - 1).bit_length()
    G = s["HV"] // s["H"]
    tiles = [(bv, w) for bv in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)
             if 1024 <= bv * bk <= 4096 and 32 <= bv * bk // (32 * w) <= 128 and bv < 2 * s["dv"]]
    size = min({t[0] * bk for t in tiles}, key=lambda n: abs(n - 2048))
    mid = [t for t in tiles if t[0] * bk == size]  # 2K-element tiles (the fallback's size) where dk allows
    out = []
    if kind in ("none", "residual"):
        # residual holds a second fp32 tile (the checkpoint sum): no 128-per-thread tiles
        out += [KernelConfig(bv, w) for bv, w in tiles if kind == "none" or bv * bk // (32 * w) <= 64]
        out += [KernelConfig(bv, w, tiles_per_program=2) for bv, w in mid]
        if G > 1:
            out += [KernelConfig(bv, w, heads_per_program=G) for bv, w in tiles if bv * bk <= 2048]
    elif kind.startswith("ssc"):
        out += [KernelConfig(bv, w, two_pass=True) for bv, w in tiles]
        whole = mid + [t for t in tiles if t[0] * bk == 4096 and t[0] * bk // (32 * t[1]) == 32]
        out += [KernelConfig(bv, w, tiles_per_program=min(8, -(-s["dv"] // bv))) for bv, w in whole]
        if G > 1:
            bv, w = mid[-1]
            out += [KernelConfig(bv, w, heads_per_program=G, two_pass=True),
                    KernelConfig(bv, w, tiles_per_program=min(8, -(-s["dv"] // bv)), heads_per_program=G)]
    else:  # grm
        small = [min(tiles), mid[-1], max(tiles)]
        out += [KernelConfig(bv, w, two_pass=True, num_stages=st) for bv, w in dict.fromkeys(small) for st in (2, 3)]
        if G > 1:
            out.append(KernelConfig(*mid[-1], heads_per_program=G, two_pass=True, num_stages=3))
    return list(dict.fromkeys(out))


# ---- compile workers (spawned processes: CUDA does not survive a fork) ----
_WORKER: dict = {}


def _compile(name: str, s: dict, kind: str, config_fields: dict, device: str = "cuda") -> str | None:
    """Run one step at B=2 with this config (compiling it into Triton's on-disk cache) and check it
    against the torch path (a boundary row included): None, or why it failed to compile or run, or
    that its results are wrong (such a config is left out of the sweep, so it never reaches a table)."""
    from kernel_cells import SEG, Cells, _rel  # noqa: PLC0415

    from mcserve.kernels.decode import LayerMemory, get_decode_path  # noqa: PLC0415
    from mcserve.kernels.decode.residual import rebuild_ckpt_sum  # noqa: PLC0415
    from mcserve.kernels.decode.tuning import KernelConfig  # noqa: PLC0415
    from mcserve.kernels.mc_spec import MCSpec  # noqa: PLC0415

    if "cells" not in _WORKER:
        cfg = dict(batches=[2], cached=CACHED if device == "cuda" else SMOKE["cached"], pool_bytes=0)
        _WORKER["cells"] = Cells(torch.device(device), cfg, SEG, deadline=float("inf"))
    cells = _WORKER["cells"]
    agg, k = KINDS[kind]
    N = 0 if agg == "none" else cells.cfg["cached"]
    spec, x = MCSpec(agg, SEG, top_k=max(k, 1)), cells.inputs(s, 2)
    batch, memory = cells.batch(name, s, 2, N, boundary_row=True, top_k_max=max(k, 1)), cells.memory(name, s)
    csum = None
    if agg == "residual":
        csum = torch.empty_like(memory.state[:2])
        for r in range(2):
            rebuild_ckpt_sum(csum[r], memory.ckpt, batch.block_table[r])
    ys, states = [], []
    try:
        for path, opts in (("triton", dict(config=KernelConfig(**config_fields))), ("torch", {})):
            mem = LayerMemory(memory.state[:2].clone(), memory.key_sum[:2].clone(), memory.ckpt, memory.ckpt_key,
                              None if csum is None else csum.clone(), None)
            ys.append(get_decode_path(path, **opts)(*x, spec=spec, batch=batch, memory=mem).float())
            states.append(torch.cat([mem.state.flatten(), mem.key_sum.flatten(), mem.ckpt[-1].float().flatten()]))
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (a config that does not compile is left out, and said so)
        return f"{type(e).__name__}: {e}"[:300]
    # y to fp32 rounding order; the state with the new bf16 checkpoint's rounding flips (1e-3 at real sizes)
    err_y, err_s = _rel(ys[0], ys[1]), _rel(states[0], states[1])
    if not (err_y <= 1e-4 and err_s <= 1e-2):
        return f"wrong result against the torch path: y rel err {err_y:.1e}, state {err_s:.1e}"
    return None


def precompile(tasks: list[tuple], deadline: float) -> dict[tuple, str]:
    """Compile the (shape name, shape, kind, config) tasks on one worker per CPU core until `deadline`.
    Returns {(name, kind, config): why} for the configs that failed to compile or run or gave wrong
    results (left out of the sweep); what a broken worker or the deadline left undone is compiled (and
    not checked) by the timing loop itself."""
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    bad: dict[tuple, str] = {}
    undone = 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile, n, s, kind, asdict(c)): (n, kind, c) for n, s, kind, c in tasks}
        done, pending = wait(futures, timeout=max(1.0, deadline - time.monotonic()))
        for f in done:
            if f.exception() is not None:
                undone += 1
                print(f"compile worker failed: {type(f.exception()).__name__}: {f.exception()}"[:300], flush=True)
            elif f.result():
                bad[futures[f]] = f.result()
        undone += len(pending)
        pool.shutdown(wait=False, cancel_futures=True)
    print(f"compiled {len(tasks) - len(bad) - undone} of {len(tasks)} candidates on {workers} workers; "
          f"{len(bad)} failed, {undone} left to the timing loop", flush=True)
    return bad


def _pick(arg: str | None, everything: list, what: str) -> list:
    """The comma-separated subset `arg` of `everything` (in arg's order), or everything."""
    if arg is None:
        return everything
    picked = [type(everything[0])(x) for x in arg.split(",")]
    bad = [x for x in picked if x not in everything]
    if bad:
        raise SystemExit(f"--{what}: {bad} not among {everything}")
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the table's path (its folder also gets kernel_sweep.json/.md)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new cell after this many seconds")
    ap.add_argument("--compile-share", type=float, default=0.45, help="of the budget, at most for the compiles")
    ap.add_argument("--batches", help=f"comma-separated batch sizes, in this order (default {BATCHES})")
    ap.add_argument("--kinds", help=f"comma-separated kinds (default all: {list(KINDS)})")
    ap.add_argument("--shapes", help="comma-separated shape names (default all)")
    ap.add_argument("--variants", choices=("old", "new", "all"), default="all",
                    help="old: the candidates the committed table was swept from; new: prefetch and small tiles")
    ap.add_argument("--fla", action="store_true", help="time fla's step beside each swept (shape, B) of kind none")
    ap.add_argument("--merge", help="a table of this card whose entries the sweep did not redo go into --out too")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_cells import SEG, SHAPES, SMOKE_SHAPES, Cells  # noqa: PLC0415 (after the interpreter flag)

    from mcserve.kernels.decode.tuning import ConfigTable, Entry, card_of, shape_class  # noqa: PLC0415

    start = time.monotonic()
    deadline = start + args.budget_s
    all_shapes = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = {n: all_shapes[n] for n in _pick(args.shapes, list(all_shapes), "shapes")}
    batches = _pick(args.batches, SMOKE["batches"] if args.smoke else BATCHES, "batches")
    kinds = _pick(args.kinds, SMOKE["kinds"] if args.smoke else list(KINDS), "kinds")
    cached = SMOKE["cached"] if args.smoke else CACHED
    dev = torch.device("cpu" if args.smoke else "cuda")
    merge = ConfigTable.read(args.merge) if args.merge else None
    if merge and merge.card != card_of(dev):
        raise SystemExit(f"--merge: {args.merge} is the table of {merge.card}, this is {card_of(dev)}")
    cands = {(n, kind, B): candidates(s, kind, args.smoke, B, args.variants)
             for n, s in shapes.items() for kind in kinds for B in batches}
    failed: dict[tuple, str] = {}
    if dev.type == "cuda":
        tasks = list(dict.fromkeys((n, kind, c) for (n, kind, _), cs in cands.items() for c in cs))
        failed = precompile([(n, shapes[n], kind, c) for n, kind, c in tasks],
                            start + args.compile_share * args.budget_s)
    # as many state slots as the full sweep's largest batch, whichever batches run: a small batch's
    # graph cycles through the same pool (several times the L2), so times compare across sweeps
    cfg = dict(batches=BATCHES if not args.smoke else batches, cached=cached,
               pool_bytes=SMOKE["pool_bytes"] if args.smoke else 2 << 30)
    cells = Cells(dev, cfg, SEG, deadline=deadline, quiet=True)
    cells.graph_reps = 3
    copy = cells.copy_bandwidth()
    print(f"[{time.monotonic() - start:6.1f}s] device copy {copy:.0f} GB/s; fla: {cells.fla_status}", flush=True)
    rows, entries = [], []
    for B in batches:
        for n, s in shapes.items():
            for kind in kinds:
                agg, k = KINDS[kind]
                if agg == "grm" and B > GRM_MAX_BATCH:
                    continue
                if args.fla and kind == "none" and (r := cells.fla(n, s, B)):
                    r["t_ms"] = r["graph_ms"] or r["ms"]
                    rows.append(r)
                ran, tried = [], [c for c in cands[(n, kind, B)] if (n, kind, c) not in failed]
                old = set(base_candidates(s, kind))
                for c in tried:
                    r = cells.mc(n, s, B, agg, k, cached, c, eager=dev.type != "cuda")
                    if r is None:
                        break  # the budget is spent
                    r["t_ms"] = r["graph_ms"] or r["ms"]  # None: its graph capture failed
                    r["kind"], r["variant"] = kind, "old" if c in old else "new"
                    ran.append((r, c))
                rows += [r for r, _ in ran]
                timed = [(r, c) for r, c in ran if r["t_ms"]]
                if not timed or len(ran) < len(tried):
                    continue  # cut by the budget: no entry from a partial comparison
                best, c = min(timed, key=lambda rc: rc[0]["t_ms"])
                entries.append(Entry(shape_class(s["H"], s["HV"], s["dk"], s["dv"]), kind, B * s["HV"], c,
                                     round(best["t_ms"], 5), round(best["bytes"] / best["t_ms"] / 1e6 / copy, 3),
                                     f"shape {n} B={B}"))
                print(f"[{time.monotonic() - start:6.1f}s] {n} {kind} B={B}: {c} {best['t_ms']:.4f} ms "
                      f"({entries[-1].of_copy:.2f} of copy; {len(timed)} configs)", flush=True)
    import triton  # noqa: PLC0415

    source = (f"benchmarks/kernel_sweep.py {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, triton "
              f"{triton.__version__}, {'graph replay' if dev.type == 'cuda' else 'eager (interpreter)'}, copy "
              f"{copy:.0f} GB/s")
    if merge:
        redone = {(e.shape, e.kind, e.pairs) for e in entries}
        entries += [e for e in merge.entries if (e.shape, e.kind, e.pairs) not in redone]
        source = f"{merge.source}; {len(redone)} entries re-swept by {source}"
    table = ConfigTable(card_of(dev), tuple(sorted(entries, key=lambda e: (e.shape, e.kind, e.pairs))), source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write(out)
    info = dict(card=table.card, source=source, copy_gbps=copy, wall_s=time.monotonic() - start,
                failed={f"{n} {kind} {c}": why for (n, kind, c), why in failed.items()}, skipped=cells.skipped,
                graph_errors=cells.graph_errors, fla=cells.fla_status, rows=rows)
    (out.parent / "kernel_sweep.json").write_text(json.dumps(info, indent=1))
    (out.parent / "kernel_sweep.md").write_text(markdown(info, table))
    print(comparison(rows), flush=True)
    print(f"table: {len(table.entries)} entries -> {out}; {len(rows)} cells timed, {len(failed)} candidates left "
          f"out, {len(cells.skipped)} cells skipped for time; wall {info['wall_s']:.0f} s", flush=True)


def comparison(rows: list[dict]) -> str:
    """Per swept (shape, kind, B): the fastest old candidate, the fastest new one and fla (kind none),
    milliseconds, with the old and fla times as multiples of the best new: the table's answer to
    'did the new variants win, and is k=0 at least as fast as fla'."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r.get("t_ms"):
            key = (r["shape"], r.get("kind", "none"), r["B"])
            col = r.get("variant", "fla") if r["path"] == "triton" else "fla"
            if col not in best.setdefault(key, {}) or r["t_ms"] < best[key][col]["t_ms"]:
                best[key][col] = r
    lines = ["| shape | kind | B | best old ms | best new ms | fla ms | old / new | fla / new | best new config |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, kind, B), b in best.items():
        new, old, fla = (b.get(c, {}).get("t_ms") for c in ("new", "old", "fla"))
        lines.append(f"| {shape} | {kind} | {B} | " + " | ".join(f"{x:.4f}" if x else "-" for x in (old, new, fla))
                     + " | " + " | ".join(f"{x / new:.2f}" if x and new else "-" for x in (old, fla))
                     + f" | {b['new']['config'] if 'new' in b else '-'} |")
    return "\n".join(lines)


def markdown(info: dict, table) -> str:
    lines = [f"# Decode launch-config sweep on {info['card']}", "", info["source"] + f"; wall {info['wall_s']:.0f} s.",
             "", "| shape class | kind | B*HV | swept at | config | ms | of copy |", "|---|---|---|---|---|---|---|"]
    for e in table.entries:
        lines.append(f"| {e.shape} | {e.kind} | {e.pairs} | {e.swept} | {e.config} | {e.ms:.4f} | {e.of_copy:.2f} |")
    lines += ["", comparison(info["rows"]), "", "| path | shape | B | aggregation | k | config | ms | GB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        t = r["t_ms"]
        lines.append(f"| {r['path']} | {r['shape']} | {r['B']} | {r['agg']} | {r['k']} | {r.get('config', '')} | "
                     + (f"{t:.4f} | {r['bytes'] / t / 1e6:.0f} |" if t else "- | - |"))
    if info["failed"]:
        lines += ["", "Left out: " + "; ".join(f"{k}: {v}" for k, v in info["failed"].items())]
    if info["skipped"]:
        lines += ["", f"Skipped for time: {len(info['skipped'])} cells"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
