"""Prefill cost of one chunk against the number of checkpoints its sequence has cached (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/prefill_scaling.py                               (CPU, small preset)
    bash tests/gpu/run_on_device.sh python3 benchmarks/prefill_scaling.py --preset 1.3b --out $OUT/ps   (H200)

Issue 12 measured the old per-sequence prefill at 43 ms for a 63-token chunk with N=4 cached
checkpoints and 3.1 s with N=512 on CPU: the readout multiplied out the union of the chunk's
selections. Here: one chunk of --tokens tokens resuming in the middle of a segment of a sequence with N
cached checkpoints (random pools), `model.prefill_batch` with the path this device selects, for each
aggregation. What must stay flat in N is the readout of the selected checkpoints (ssc: tokens x k);
the router still scores every cached segment key (tokens x N x dk, small next to a checkpoint).
Median of --repeats calls after one warm-up; the table goes to stdout and --out/prefill_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.batched import select_kernels
from mcserve.server.model.batched_prefill import PrefillInput
from mcserve.server.model.init_model import build_config, init_weights
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--segment", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=63)
    ap.add_argument("--cached", default="4,64,512")
    ap.add_argument("--aggregations", default="none,ssc,grm,residual")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ck_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the engine's "auto"
    C, T = args.segment, args.tokens
    counts = [int(n) for n in args.cached.split(",")]
    cfg = build_config(args.preset, 32000 if args.preset == "1.3b" else 1000,
                       {"aggregation": "ssc", "segment_size": C, "top_k": 4, "router": "query"})
    with torch.device(dev):
        model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed=0, std=0.02)
    model = model.to(dtype).eval()
    states = model.allocate_states(1)
    ckpts = model.allocate_checkpoints(max(counts) + 2, ck_dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    for t in (ckpts.ssm, ckpts.key):
        t.copy_(torch.randn(t.shape, generator=g, device=dev, dtype=torch.float32).mul_(0.05).to(t.dtype))
    ids = torch.randint(3, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    print(f"machine: {machine()}\n{args.preset} preset, {dtype}, checkpoints {ck_dtype}, segment {C}, "
          f"{T}-token chunk", flush=True)
    for agg in args.aggregations.split(","):
        model.spec = MCSpec(agg, C, top_k=4)
        kernels = select_kernels(dev, model.spec, dtype)
        for n in counts:
            start = n * C + C // 2 - T // 2  # inside segment n, after n whole cached segments
            end = start + T
            writes = [n + 1 + w for w in range((end // C) - (start // C))]  # a boundary the chunk crosses
            chunk = PrefillInput(ids, 0, start, list(range(n)), writes)

            def call(chunk=chunk, kernels=kernels) -> None:
                model.prefill_batch([chunk], states, ckpts, kernels)

            call()
            times = []
            for _ in range(args.repeats):
                sync(dev)
                t0 = time.perf_counter()
                call()
                sync(dev)
                times.append(time.perf_counter() - t0)
            rows.append({"aggregation": agg, "cached": n, "ms": statistics.median(times) * 1000,
                         "path": kernels.name})
            print(f"{agg:9s} N={n:4d}  {rows[-1]['ms']:8.2f} ms  ({kernels.name})", flush=True)
    print("\n| aggregation | " + " | ".join(f"N={n} ms" for n in counts) + f" | N={counts[-1]} / N={counts[0]} |")
    print("|---|" + "---:|" * (len(counts) + 1))
    for agg in args.aggregations.split(","):
        ms = [r["ms"] for r in rows if r["aggregation"] == agg]
        print(f"| {agg} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[-1] / ms[0]:.2f}x |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "prefill_scaling.json").write_text(json.dumps(
            {"machine": machine(), "preset": args.preset, "segment": C, "tokens": T, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
