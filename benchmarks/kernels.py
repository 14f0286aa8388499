"""Decode-kernel benchmark: the Triton MC-GDN step against fla 0.6's `fused_recurrent_gated_delta_rule`,
the torch path and flash SDPA decode, as time (eager, and per call under CUDA-graph replay), bytes that
must move, GB/s and the fraction of a device copy measured in the same run.

    bash tests/gpu/run_on_device.sh python3 benchmarks/kernels.py --out $OUT    # H200, < 4 min
    python benchmarks/kernels.py --smoke --out /tmp/kbench                     # CPU, Triton interpreter
    ... kernels.py --batches 1,8,32,64 --top-k 0,4 --out $OUT                     # part of the grid

The Triton step runs the launch config its wrapper chooses: the card's committed table
(kernels/decode/configs/), or with --configs a fresh one from benchmarks/kernel_sweep.py, else the
fallback heuristic; each row names the config. Order: copy bandwidth; correctness at real sizes
(Triton vs the torch path, and `none` vs fla); the 32K comparison with flash SDPA; the main grid
(Triton, fla, the torch path), batch sizes in the order of what the targets judge (B >= 64 first).
Past --budget-s no new cell starts (the skipped ones are listed). Every pool holds random data; 64
cached checkpoints per row are drawn from a bf16 pool several times the L2 (rows may share blocks).
Without fla (or einops) the fla column is n/a. One progress line per cell; writes kernels.json and
kernels.md to --out; prints a summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import fmt_frac, fmt_ms

FULL = dict(
    batches=[64, 256, 512, 128, 32, 8, 1], top_k=[0, 2, 4, 8], cached=64, grm_n=[16, 64, 256], grm_batches=[64, 256],
    pool_bytes=2 << 30, torch_batches=[1, 64, 256], sdpa_len=32768, sdpa_batch=64, check_batch=8)
SMOKE = dict(
    batches=[1, 3], top_k=[0, 2], cached=3, grm_n=[2], grm_batches=[1], pool_bytes=1 << 20, torch_batches=[2],
    sdpa_len=64, sdpa_batch=2, check_batch=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for kernels.json and kernels.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new cell after this many seconds")
    ap.add_argument("--configs", help="a config table (kernel_sweep.py's output) to run instead of the committed one")
    ap.add_argument("--batches", help="comma-separated batch sizes: only these (grm and torch cells too)")
    ap.add_argument("--top-k", help="comma-separated k of the main grid (0 = none): only these")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_cells import SEG, SHAPES, SMOKE_SHAPES, Cells  # noqa: PLC0415 (after the interpreter flag)

    from mcserve.kernels.decode import tuning  # noqa: PLC0415

    cfg = dict(SMOKE if args.smoke else FULL)
    batches = cfg["batches"]  # cfg's own list stays whole: the state pool has slots for its largest batch
    if args.batches:
        batches = [int(x) for x in args.batches.split(",")]
        cfg.update({key: [B for B in cfg[key] if B in batches] for key in ("grm_batches", "torch_batches")})
    if args.top_k:
        cfg["top_k"] = [int(x) for x in args.top_k.split(",")]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dev = torch.device("cpu" if args.smoke else "cuda")
    start = time.monotonic()
    cells = Cells(dev, cfg, SEG, deadline=start + args.budget_s)
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                 "torch": torch.__version__, "segment_size": SEG, "smoke": args.smoke}
    table = tuning.use_table(args.configs) if args.configs else tuning.table_for(tuning.card_of(dev))
    out["config_table"] = (f"{args.configs or 'committed'}: {table.card}, {len(table.entries)} entries ({table.source})"
                           if table else "none for this card: the fallback heuristic")
    if table and table.card != tuning.card_of(dev):
        out["config_table"] += f" -- NOT this card ({tuning.card_of(dev)}): the fallback runs"
    print(f"config table: {out['config_table']}", flush=True)
    out["copy_gbps"] = cells.copy_bandwidth()
    print(f"device copy: {out['copy_gbps']:.0f} GB/s", flush=True)
    print(f"fla: {cells.fla_status}", flush=True)
    out["checks"] = []
    for name, s in shapes.items():
        out["checks"].append(cells.check(name, s))
        print(f"[{time.monotonic() - start:6.1f}s] check", out["checks"][-1], flush=True)
    a = shapes["a"]
    n32k = cfg["sdpa_len"] // SEG if not args.smoke else cfg["cached"]
    sdpa = cells.sdpa(a, cfg["sdpa_batch"], cfg["sdpa_len"])
    mc32k = cells.mc("a", a, cfg["sdpa_batch"], "ssc", 4 if not args.smoke else 2, n32k, None)
    out["sdpa_32k"] = dict(sdpa=sdpa, mc=mc32k, speedup=(sdpa["ms"] / mc32k["ms"]) if sdpa and mc32k else None,
                           graph_speedup=(sdpa["graph_ms"] / mc32k["graph_ms"])
                           if sdpa and mc32k and sdpa["graph_ms"] and mc32k["graph_ms"] else None)
    rows = []
    for B in batches:
        for name, shape in shapes.items():
            rows.append(cells.fla(name, shape, B))
            for k in cfg["top_k"]:
                rows.append(cells.mc(name, shape, B, "none" if k == 0 else "ssc", k, cfg["cached"], None))
    for name, shape in shapes.items():
        for B in cfg["grm_batches"]:
            for n in cfg["grm_n"]:
                rows.append(cells.mc(name, shape, B, "grm", 0, n, None))
    for B in cfg["torch_batches"]:
        for k in (0, 4 if not args.smoke else 2):
            rows.append(cells.torch_path("a", a, B, k, cfg["cached"]))
    order = {"fla": 0, "triton": 1, "torch": 2}
    rows = sorted((r for r in rows if r), key=lambda r: (r["shape"], order[r["path"]], r["agg"] != "none", r["B"],
                                                          r["k"], r["N"]))
    for r in rows:
        r["frac_copy"] = r["gbps"] / out["copy_gbps"] if r["gbps"] else None
        r["graph_frac_copy"] = r["graph_gbps"] / out["copy_gbps"] if r["graph_gbps"] else None
    out["rows"] = rows
    out["skipped"] = cells.skipped
    out["graph_errors"] = cells.graph_errors
    out["fla"] = cells.fla_status
    out["wall_s"] = time.monotonic() - start
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernels.json").write_text(json.dumps(out, indent=1))
    (path / "kernels.md").write_text(markdown(out))
    print(summary(out))


def markdown(out: dict) -> str:
    lines = [f"# Decode kernels on {out['device']} (torch {out['torch']})", "",
             f"Device copy: {out['copy_gbps']:.0f} GB/s. C = {out['segment_size']}. fla 0.6: "
             f"{'ok' if out['fla'] == 'ok' else 'n/a (' + out['fla'] + ')'}. Run: {out['wall_s']:.0f} s.", "",
             "| check | shape | aggregation | max rel err y | max rel err state |", "|---|---|---|---|---|"]
    for c in out["checks"]:
        for agg, e in c["errors"].items():
            lines.append(f"| {c['what']} | {c['shape']} | {agg} | {e['y']:.1e} | {e['state']:.1e} |")
        e = c.get("vs_fla_none")
        lines.append(f"| triton vs fla (fp32) | {c['shape']} | none | "
                     + (f"{e['y']:.1e} | {e['state']:.1e} |" if e else "n/a | n/a |"))
    lines += ["", f"Launch configs: {out['config_table']}.", "",
              "Eager: one call from Python (do_bench, L2 flushed), the host's launch work included. Graph: "
              "back-to-back calls captured in one CUDA graph and replayed, per call, as the engine runs its step; "
              "the targets are judged on the graph column.", "",
              "| path | shape | B | aggregation | k | N | eager ms | of copy | graph ms | of copy | MB moved "
              "| config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['path']} | {r['shape']} | {r['B']} | {r['agg']} | {r['k']} | {r['N']} | "
                     f"{fmt_ms(r['ms'])} | "
                     f"{fmt_frac(r['frac_copy'])} | {fmt_ms(r['graph_ms'])} | {fmt_frac(r['graph_frac_copy'])} | "
                     f"{r['bytes'] / 1e6:.1f} | {r.get('config', '')} |")
    s = out["sdpa_32k"]
    if s["speedup"]:
        lines += ["", f"SDPA decode over {s['sdpa']['len']} tokens at B={s['sdpa']['B']}: {s['sdpa']['ms']:.3f} ms "
                      f"eager, {fmt_ms(s['sdpa']['graph_ms'])} ms graph; one MC layer step at that context (ssc "
                      f"k={s['mc']['k']}, {s['mc']['N']} cached): {s['mc']['ms']:.4f} ms eager, "
                      f"{fmt_ms(s['mc']['graph_ms'])} ms graph: {s['speedup']:.1f}x faster eager, "
                      + (f"{s['graph_speedup']:.1f}x graph." if s["graph_speedup"] else "graph n/a.")]
    if out["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(out["skipped"])]
    return "\n".join(lines) + "\n"


def summary(out: dict) -> str:
    """Targets at a glance, on graph replay where there is one (else eager): fraction of copy at B >= 64 for
    k=0 and k=4, k=0 vs fla, k=4 vs fla, SDPA."""
    by = {(r["path"], r["shape"], r["B"], r["agg"], r["k"], r["N"]): r for r in out["rows"]}
    cached = max((r["N"] for r in out["rows"] if r["agg"] == "ssc"), default=0)

    def t(r: dict) -> tuple[float, float]:
        return (r["graph_ms"], r["graph_frac_copy"]) if r["graph_ms"] else (r["ms"], r["frac_copy"])

    lines = ["", "(graph replay where measured, else eager)",
             "shape    B | k=0 ms   of copy  fla/it | k=4 ms   of copy  it/fla | fla ms", "-" * 70]
    for r in out["rows"]:
        if r["path"] != "triton" or r["agg"] != "none":
            continue
        s, B = r["shape"], r["B"]
        fla = by.get(("fla", s, B, "none", 0, 0))
        k4 = by.get(("triton", s, B, "ssc", 4, cached)) or by.get(("triton", s, B, "ssc", 2, cached))
        (ms0, f0), fms = t(r), t(fla)[0] if fla else None
        c0 = f"{ms0:.4f}   {f0:.2f}   " + (f"{fms / ms0:.2f}x" if fms else "n/a")
        c4 = "-"
        if k4:
            ms4, f4 = t(k4)
            c4 = f"{ms4:.4f}   {f4:.2f}   " + (f"{ms4 / fms:.2f}x" if fms else "n/a")
        lines.append(f"{s:>5} {B:>4} | {c0:>24} | {c4:>24} | " + (f"{fms:.4f}" if fms else "n/a"))
    s = out["sdpa_32k"]
    if s["speedup"]:
        sp, mc, sd = ((s["graph_speedup"], s["mc"]["graph_ms"], s["sdpa"]["graph_ms"]) if s["graph_speedup"] else
                      (s["speedup"], s["mc"]["ms"], s["sdpa"]["ms"]))
        lines.append(f"MC step at 32K (B={s['sdpa']['B']}) vs SDPA decode: {sp:.1f}x faster ({mc:.4f} vs {sd:.3f} ms)")
    if out["skipped"]:
        lines.append(f"skipped for time: {len(out['skipped'])} cells")
    lines.append(f"fla: {out['fla']}; wall {out['wall_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
