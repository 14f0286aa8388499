"""Replay decode-kernel benchmark (prototype, kernels/decode/replay.py): the step that writes the fp32
state only every W steps, side by side in one run with the existing Triton step and fla 0.6's
`fused_recurrent_gated_delta_rule`, as time per step under CUDA-graph replay, bytes that must move per
step, GB/s and the fraction of a device copy measured in the same run.

    bash tests/gpu/run_on_device.sh python3 benchmarks/kernels_replay.py --out $OUT     # H200, < 4 min
    python benchmarks/kernels_replay.py --smoke --out /tmp/rbench                    # CPU, Triton interpreter

Set-up from benchmarks/kernel_cells.py (shapes a, b, c; random pools; 64 cached checkpoints per row in
a 2 GiB bf16 pool; the existing step's config from the card's table). A replay cell's graph holds W
consecutive steps of every one of its windows of B slots (window by window, step by step: between two
steps of a row the other windows' states pass through the L2), so each row flushes once per W steps
as in serving; the time is per step. Replay configs: the fallback tile (one per program) and 4 tiles
per program; each row names its config. Order: copy bandwidth; replay against the existing step at a
real size (W + 1 steps, a boundary row; y every step, the materialised states, the new checkpoint);
then B = 256, 64, 8, 1 for k = 0, 4. Past --budget-s no new cell starts. Writes kernels_replay.json and
kernels_replay.md to --out; prints a summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import fmt_frac, fmt_ms

FULL = dict(batches=[256, 64, 8, 1], top_k=[0, 4], cached=64, pool_bytes=2 << 30, window=16, check_batch=8)
SMOKE = dict(batches=[2], top_k=[0, 2], cached=3, pool_bytes=1 << 20, window=3, check_batch=2)


def replay_bytes(s: dict, B: int, agg: str, k: int, N: int, W: int) -> int:
    """Bytes one step must move on average over W steps: kernel_cells.mc_bytes less the state writes of
    W - 1 steps in W, plus the log: (W - 1) / 2 entries read (counts 0 .. W - 1) and (W - 1) / W entries
    written per step, an entry being k (per q/k head), v, g and beta (per v-head), fp32."""
    from kernel_cells import mc_bytes  # noqa: PLC0415

    H, HV, dk, dv = s["H"], s["HV"], s["dk"], s["dv"]
    entry = 4 * (H * dk + HV * dv + 2 * HV)
    saved = 4 * HV * dv * dk * (W - 1) / W
    return int(mc_bytes(s, B, agg, k, N) + B * (entry * ((W - 1) / 2 + (W - 1) / W) - saved))


class ReplayCells:
    """The replay cells on top of kernel_cells.Cells' pools, inputs, batches and timers."""

    def __init__(self, cells, seg: int, window: int) -> None:
        self.cells, self.seg, self.W = cells, seg, window
        self._logs: dict[str, object] = {}

    def log_pool(self, name: str, s: dict):
        from mcserve.kernels.decode.replay import ReplayLog  # noqa: PLC0415

        if name not in self._logs:
            self._logs[name] = ReplayLog.empty(self.cells.slots, s["H"], s["HV"], s["dk"], s["dv"], self.W,
                                               self.cells.dev)
        return self._logs[name]

    def step_call(self, name: str, s: dict, B: int, k: int, N: int, config, window: int, step: int):
        from mcserve.kernels.decode.replay import replay_decode_step  # noqa: PLC0415
        from mcserve.kernels.mc_spec import MCSpec  # noqa: PLC0415

        c = self.cells
        agg = "none" if k == 0 else "ssc"
        memory, log, x = c.memory(name, s), self.log_pool(name, s), self._inputs(name, s, B)
        batch = c.batch(name, s, B, N, window, top_k_max=max(k, 1))
        batch = replace(batch, positions=batch.positions + step)
        spec = MCSpec(agg, self.seg, top_k=max(k, 1))
        return lambda: replay_decode_step(*x, spec=spec, batch=batch, memory=memory, log=log, out_dtype=torch.bfloat16,
                                          config=config)

    def _inputs(self, name: str, s: dict, B: int) -> tuple:
        key = ("inputs", name, B)
        if key not in self._logs:
            self._logs[key] = self.cells.inputs(s, B)
        return self._logs[key]

    def cell(self, name: str, s: dict, B: int, k: int, N: int, config) -> dict | None:
        """Eager one step, and per step of a graph of W steps of every window of B slots."""
        from kernel_cells import Cells  # noqa: PLC0415

        from mcserve.kernels.decode.tuning import KernelConfig  # noqa: PLC0415

        c = self.cells
        agg = "none" if k == 0 else "ssc"
        N = 0 if agg == "none" else N
        if c.late(f"replay {name} B={B} k={k} {config}"):
            return None
        windows = max(1, min(c.slots // B, 128))
        ms = c.bench(self.step_call(name, s, B, k, N, config, 0, 0))
        graph_ms = c.graph_bench(lambda i: self.step_call(name, s, B, k, N, config, i % windows, i // windows),
                                 self.W * windows)
        return c.log(Cells.row("replay", ms, graph_ms, replay_bytes(s, B, agg, k, N, self.W), shape=name, B=B, agg=agg,
                               k=k, N=N, config=str(config or KernelConfig()), window=self.W))

    def check(self, name: str, s: dict, B: int, N: int) -> dict:
        """Replay against the existing Triton step for W + 1 steps from the same pools (ssc k=4, row 0
        ends its segment at the first step): max relative error of y over the steps, of the states after
        materialise, of the new checkpoint."""
        from kernel_cells import _rel  # noqa: PLC0415

        from mcserve.kernels.decode import LayerMemory  # noqa: PLC0415
        from mcserve.kernels.decode.replay import ReplayLog, materialise, replay_decode_step  # noqa: PLC0415
        from mcserve.kernels.decode.triton import triton_decode_step  # noqa: PLC0415
        from mcserve.kernels.mc_spec import MCSpec  # noqa: PLC0415

        c = self.cells
        memory = c.memory(name, s)
        spec = MCSpec("ssc", self.seg, top_k=4)
        mems = [LayerMemory(memory.state[:B].clone(), memory.key_sum[:B].clone(), memory.ckpt, memory.ckpt_key)
                for _ in range(2)]
        log = ReplayLog.empty(B, s["H"], s["HV"], s["dk"], s["dv"], self.W, c.dev)
        first = c.batch(name, s, B, N, boundary_row=True, top_k_max=4)
        err_y, err_ckpt = 0.0, None
        for step in range(self.W + 1):
            batch = replace(first, positions=first.positions + step, write_rows=None) if step else first
            if step:
                batch = replace(batch, write_blocks=torch.full_like(first.write_blocks, -1))
            x = c.inputs(s, B)
            y_ref = triton_decode_step(*x, spec=spec, batch=batch, memory=mems[0])
            new_ckpt = memory.ckpt[-1].clone() if step == 0 else None
            y = replay_decode_step(*x, spec=spec, batch=batch, memory=mems[1], log=log)
            err_y = max(err_y, _rel(y, y_ref))
            if step == 0:
                err_ckpt = _rel(memory.ckpt[-1], new_ckpt)
        materialise(mems[1].state, log, torch.arange(B, device=c.dev))
        return dict(what="replay vs triton step", shape=name, B=B, steps=self.W + 1, y=err_y,
                    state=_rel(mems[1].state, mems[0].state), key_sum=_rel(mems[1].key_sum, mems[0].key_sum),
                    ckpt=err_ckpt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for kernels_replay.json and kernels_replay.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new cell after this many seconds")
    ap.add_argument("--window", type=int, help="W, steps per materialisation (default 16; smoke 3)")
    ap.add_argument("--batches", help="comma-separated batch sizes: only these")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_cells import SEG, SHAPES, SMOKE_SHAPES, Cells  # noqa: PLC0415 (after the interpreter flag)

    from mcserve.kernels.decode.tuning import KernelConfig  # noqa: PLC0415

    cfg = dict(SMOKE if args.smoke else FULL)
    if args.window:
        cfg["window"] = args.window
    batches = [int(x) for x in args.batches.split(",")] if args.batches else cfg["batches"]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dev = torch.device("cpu" if args.smoke else "cuda")
    start = time.monotonic()
    cells = Cells(dev, cfg, SEG, deadline=start + args.budget_s)
    rc = ReplayCells(cells, SEG, cfg["window"])
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                 "torch": torch.__version__, "segment_size": SEG, "window": cfg["window"], "smoke": args.smoke}
    out["copy_gbps"] = cells.copy_bandwidth()
    print(f"device copy: {out['copy_gbps']:.0f} GB/s; fla: {cells.fla_status}; W = {cfg['window']}", flush=True)
    out["checks"] = []
    for name, s in shapes.items():
        out["checks"].append(rc.check(name, s, cfg["check_batch"], cfg["cached"]))
        print(f"[{time.monotonic() - start:6.1f}s] check", out["checks"][-1], flush=True)
    replay_configs = [None] if args.smoke else [None, KernelConfig(tiles_per_program=4)]
    rows = []
    for B in batches:
        for name, s in shapes.items():
            rows.append(cells.fla(name, s, B))
            for k in cfg["top_k"]:
                agg = "none" if k == 0 else "ssc"
                rows.append(cells.mc(name, s, B, agg, k, cfg["cached"], None, eager=False))
                for rcfg in replay_configs:
                    rows.append(rc.cell(name, s, B, k, cfg["cached"], rcfg))
    rows = [r for r in rows if r]
    for r in rows:
        r["frac_copy"] = r["gbps"] / out["copy_gbps"] if r["gbps"] else None
        r["graph_frac_copy"] = r["graph_gbps"] / out["copy_gbps"] if r["graph_gbps"] else None
    out.update(rows=rows, skipped=cells.skipped, graph_errors=cells.graph_errors, fla=cells.fla_status,
               wall_s=time.monotonic() - start)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernels_replay.json").write_text(json.dumps(out, indent=1))
    text = summary(out)
    (path / "kernels_replay.md").write_text(markdown(out) + "\n```\n" + text + "\n```\n")
    print(text)


def _t(r: dict | None) -> float | None:
    """Graph-replay ms per step where measured, else eager."""
    return None if r is None else (r["graph_ms"] or r["ms"])


def markdown(out: dict) -> str:
    lines = [f"# Replay decode kernel on {out['device']} (torch {out['torch']})", "",
             f"Device copy: {out['copy_gbps']:.0f} GB/s. C = {out['segment_size']}, W = {out['window']}. fla 0.6: "
             f"{'ok' if out['fla'] == 'ok' else 'n/a (' + out['fla'] + ')'}. Run: {out['wall_s']:.0f} s.", "",
             "| check | shape | B | steps | max rel err y | state | key sum | new ckpt |",
             "|---|---|---|---|---|---|---|---|"]
    for c in out["checks"]:
        lines.append(f"| {c['what']} | {c['shape']} | {c['B']} | {c['steps']} | {c['y']:.1e} | {c['state']:.1e} | "
                     f"{c['key_sum']:.1e} | {c['ckpt']:.1e} |")
    lines += ["", "Graph: per step of back-to-back steps captured in one CUDA graph (replay: W steps of every "
                  "window, so each row flushes once per W steps). MB moved per step (replay: the average over W).", "",
              "| path | shape | B | aggregation | k | eager ms | graph ms | of copy | MB moved | config |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['path']} | {r['shape']} | {r['B']} | {r['agg']} | {r['k']} | {fmt_ms(r['ms'])} | "
                     f"{fmt_ms(r['graph_ms'])} | {fmt_frac(r['graph_frac_copy'] or r['frac_copy'])} | "
                     f"{r['bytes'] / 1e6:.2f} | {r.get('config', '')} |")
    if out["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(out["skipped"])]
    return "\n".join(lines) + "\n"


def summary(out: dict) -> str:
    """Per (shape, B, k): fla's step, the existing step, the best replay config; the targets' ratios
    (k=0: fla / it, >= 1 is "never slower"; k=4: it / fla, <= 1.8)."""
    by: dict = {}
    for r in out["rows"]:
        key = (r["path"], r["shape"], r["B"], r["k"])
        if r["path"] != "replay" or key not in by or _t(r) < _t(by[key]):
            by[key] = r
    lines = ["", "(graph replay where measured, else eager; ms per step)",
             "shape    B  k |   fla ms | triton ms  ratio | replay ms  ratio  of copy | best replay config",
             "-" * 96]
    for (path, shape, B, k), r in sorted(by.items(), key=lambda kv: (kv[0][1], -kv[0][2], kv[0][3])):
        if path != "replay":
            continue
        fla, tri = by.get(("fla", shape, B, 0)), by.get(("triton", shape, B, k))

        def ratio(x: dict | None, fla: dict | None = fla, k: int = k) -> str:
            if x is None or fla is None or _t(x) is None or _t(fla) is None:
                return "  n/a"
            return f"{_t(fla) / _t(x):.2f}x" if k == 0 else f"{_t(x) / _t(fla):.2f}x"

        f = r["graph_frac_copy"] or r["frac_copy"]
        lines.append(f"{shape:>5} {B:>4} {k:>2} | {fmt_ms(_t(fla)):>8} | {fmt_ms(_t(tri)):>9} {ratio(tri):>6} | "
                     f"{fmt_ms(_t(r)):>9} {ratio(r):>6} {f:8.2f} | {r['config']}")
    lines.append("ratio: k=0 fla/step (>= 1: not slower than fla), k>0 step/fla (target <= 1.8)")
    if out["skipped"]:
        lines.append(f"skipped for time: {len(out['skipped'])} cells")
    lines.append(f"fla: {out['fla']}; wall {out['wall_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
