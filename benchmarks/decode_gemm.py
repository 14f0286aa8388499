"""The decode step's matmuls alone: cuBLAS (F.linear) against kernels/triton_mm.py's configs, per
weight shape of a preset's layer and per batch, timed as CUDA-graph replays over weights cycled
through more memory than L2 holds (each layer's weights are read from HBM once per step).

    bash tests/gpu/run_on_device.sh python3 benchmarks/decode_gemm.py --out $OUT/gemm   (GPU)
    python benchmarks/decode_gemm.py --smoke --out /tmp/gemm   (CPU, Triton interpreter, tiny shapes)

Per (shape, M): F.linear's ms per call, each Triton config's ms (checked against an fp32 product
first; a config that fails the check is dropped), the best, and weight bytes / time as a fraction of
the device copy bandwidth measured in the same run (a read-only stream can beat a read+write copy).
Split-K configs include zeroing their fp32 output in the timed graph.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from common import copy_bandwidth

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def layer_shapes(preset: str, vocab: int) -> dict[str, tuple[int, int]]:
    """(N, K) of the decode step's matmuls for one layer of `preset` (fused as DecodeStep fuses them)."""
    from mcserve.server.model.init_model import build_config
    from mcserve.server.model.layers import FUSED_ROWS_ALIGN
    from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

    cfg = build_config(preset, vocab, {})
    with torch.device("meta"):
        model = MCGatedDeltaNetForCausalLM(cfg)
    block = model.model.layers[0]

    def fused(linears) -> tuple[int, int]:
        rows = sum(lin.weight.shape[0] for lin in linears)
        return rows + (-rows % FUSED_ROWS_ALIGN), linears[0].weight.shape[1]

    head = model.model.embeddings.weight if model.lm_head is None else model.lm_head.weight
    return {"in_proj": fused(block.attn.in_linears()), "o_proj": tuple(block.attn.o_proj.weight.shape),
            "gate_up": fused([block.mlp.gate_proj, block.mlp.up_proj]),
            "down": tuple(block.mlp.down_proj.weight.shape), "lm_head": tuple(head.shape)}


def configs(smoke: bool):
    from mcserve.kernels.triton_mm import MMConfig

    if smoke:
        return [MMConfig(16, 32, 1, 4, 2), MMConfig(32, 32, 2, 4, 2)]
    out = []
    for bn in (32, 64, 128):
        for bk in (64, 128):
            for split in (1, 2, 4):
                out.append(MMConfig(bn, bk, split, 4, 4))
    out += [MMConfig(128, 64, 1, 8, 4), MMConfig(128, 64, 2, 8, 4), MMConfig(16, 256, 1, 4, 3),
            MMConfig(16, 128, 2, 4, 4), MMConfig(256, 64, 1, 8, 3), MMConfig(64, 256, 1, 4, 3),
            MMConfig(64, 128, 8, 4, 4), MMConfig(32, 128, 8, 4, 4)]
    return out


def graph_ms(calls, reps: int) -> float:
    """ms per call of `calls` (a list of thunks, one per weight copy) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up (compiles, cuBLAS workspaces) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / len(calls))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", default="1,16,32,64,128,256")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--stream-mb", type=float, default=400.0, help="weight copies cycled per shape, in MB")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mcserve.kernels.triton_mm import mm  # noqa: PLC0415 (after the interpreter flag)

    dev = torch.device("cpu" if args.smoke else "cuda")
    shapes = {"tiny": (72, 48), "wide": (160, 96)} if args.smoke else layer_shapes(args.preset, args.vocab)
    batches = [3, 17] if args.smoke else [int(b) for b in args.batches.split(",")]
    out = {"device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
           "preset": args.preset, "shapes": shapes, "rows": []}
    if not args.smoke:
        import triton

        out["triton"] = triton.__version__
        out["copy_gbps"] = copy_bandwidth(dev)
        say(f"{out['device']}, copy {out['copy_gbps']:.0f} GB/s, shapes {shapes}")
    start = time.monotonic()
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (N, K) in shapes.items():
        nbytes = N * K * 2
        copies = 2 if args.smoke else max(2, math.ceil(args.stream_mb * 1e6 / nbytes))
        ws = [torch.randn(N, K, device=dev, generator=gen, dtype=torch.bfloat16) * K ** -0.5 for _ in range(copies)]
        for M in batches:
            if time.monotonic() - start > args.budget_s:
                say(f"budget: skipping {name} M={M}")
                continue
            x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.bfloat16)
            ref = (x.float() @ ws[0].float().T)
            row = {"shape": name, "N": N, "K": K, "M": M, "weight_mb": nbytes / 1e6, "configs": {}}
            if not args.smoke:
                ys = [torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in ws]
                row["torch_ms"] = graph_ms([lambda w=w, y=y, x=x: torch.mm(x, w.T, out=y)
                                           for w, y in zip(ws, ys, strict=True)], 9)
            for cfg in configs(args.smoke):
                y = mm(x, ws[0], cfg)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                if err > 1e-2:
                    row["configs"][cfg.name()] = {"error": err}
                    continue
                if args.smoke:
                    row["configs"][cfg.name()] = {"rel_err": err}
                    continue
                outs = [torch.zeros(M, N, device=dev, dtype=torch.float32 if cfg.split > 1 else torch.bfloat16)
                        for _ in ws]

                def call(w, o, cfg=cfg, x=x):
                    if cfg.split > 1:
                        o.zero_()
                    mm(x, w, cfg, out=o)

                try:
                    ms = graph_ms([lambda w=w, o=o: call(w, o) for w, o in zip(ws, outs, strict=True)], 9)
                except Exception as e:  # noqa: BLE001 (a config the card cannot run is reported, not fatal)
                    row["configs"][cfg.name()] = {"error": repr(e)[:200]}
                    continue
                row["configs"][cfg.name()] = {"ms": ms, "rel_err": err}
                del outs
            if not args.smoke:
                timed = {k: v["ms"] for k, v in row["configs"].items() if "ms" in v}
                best = min(timed, key=timed.get) if timed else None
                row["best"] = best
                row["best_ms"] = timed.get(best)
                gb = nbytes / 1e9
                row["torch_frac_copy"] = gb / (row["torch_ms"] * 1e-3) / out["copy_gbps"]
                if best:
                    row["best_frac_copy"] = gb / (row["best_ms"] * 1e-3) / out["copy_gbps"]
                    row["torch_over_best"] = row["torch_ms"] / row["best_ms"]
                say(f"{name} N={N} K={K} M={M}: torch {row['torch_ms'] * 1e3:.1f} us "
                    f"({row['torch_frac_copy']:.2f} of copy), best {best} "
                    f"{(row['best_ms'] or float('nan')) * 1e3:.1f} us ({row.get('best_frac_copy', float('nan')):.2f})")
            out["rows"].append(row)
        del ws
    out["wall_s"] = time.monotonic() - start
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "decode_gemm.json").write_text(json.dumps(out, indent=1))
    if args.smoke:
        bad = [(r["shape"], r["M"], k) for r in out["rows"] for k, v in r["configs"].items() if "error" in v]
        print("smoke:", "FAIL " + str(bad) if bad else "all configs match the fp32 product")
        sys.exit(1 if bad else 0)
    lines = ["| shape | N x K | M | cuBLAS us | of copy | best Triton | us | of copy | cuBLAS / best |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['shape']} | {r['N']} x {r['K']} | {r['M']} | {r['torch_ms'] * 1e3:.1f} | "
                     f"{r['torch_frac_copy']:.2f} | {r.get('best')} | {(r.get('best_ms') or float('nan')) * 1e3:.1f} | "
                     f"{r.get('best_frac_copy', float('nan')):.2f} | {r.get('torch_over_best', float('nan')):.2f} |")
    (path / "decode_gemm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
