"""Offline throughput of the tiny model at B=1 and B=64, idle and with a CPU hog on every core the
process may use, with the engine's default thread count and (for comparison) torch's own default.

    OMP_NUM_THREADS= nice python benchmarks/cpu_contention.py

Each configuration runs in a fresh subprocess (torch's thread pool is fixed once it has started):
"default" passes nothing (the engine takes its CPU allowance less one core, server/engine/
cpu_threads.py); "torch default" passes threads=os.cpu_count(), which is what torch does on its
own. A hog is a busy-looping process per allowed core, started before the timed runs and killed
after, each in its own session: with the kernel's autogroup scheduling (on by default) processes of
one session share one CPU share, so hogs started in the benchmark's own session would only split the
benchmark's share; in their own sessions they compete as other programs on the machine do. Prints
tokens/s and the slowdown under contention; the issue's bar is <= 2x for the default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from common import model_dir
from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams
batch, prompt_len, output_len, threads = {batch}, {prompt_len}, {output_len}, {threads}
kwargs = {{}} if threads is None else {{"threads": threads}}
llm = LLM(model_dir(None, "tiny"), device="cpu", max_num_seqs=batch, max_model_len=prompt_len + output_len + 1,
          enable_prefix_caching=False, **kwargs)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, llm.engine.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
print("READY", flush=True)
sys.stdin.readline()  # the parent starts the hogs, then says go
best = 0.0
for _ in range({repeats}):
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    elapsed = time.perf_counter() - start
    best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
print(json.dumps({{"tok_s": best, "threads": torch.get_num_threads()}}), flush=True)
"""


def measure(batch: int, threads: int | None, hog: bool, args: argparse.Namespace) -> dict:
    code = CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), batch=batch, prompt_len=args.prompt_len,
                        output_len=args.output_len, threads=threads, repeats=args.repeats)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "READY"
    hogs = []
    if hog:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                for _ in os.sched_getaffinity(0)]
        time.sleep(0.5)
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        child.wait()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration; the best is kept")
    ap.add_argument("--no-torch-default", action="store_true", help="skip the threads=os.cpu_count() comparison")
    args = ap.parse_args()
    configs = [("default", None)] + ([] if args.no_torch_default else [("torch default", os.cpu_count())])
    print(f"cores: os.cpu_count()={os.cpu_count()}, affinity={len(os.sched_getaffinity(0))}, "
          f"load average before: {os.getloadavg()[0]:.1f}; prompt {args.prompt_len}, output {args.output_len} tokens")
    print("| threads setting | B | engine threads | idle tok/s | hog on every core tok/s | slowdown |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, threads in configs:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            idle = measure(batch, threads, False, args)
            busy = measure(batch, threads, True, args)
            print(f"| {name} | {batch} | {idle['threads']} | {idle['tok_s']:,.0f} | {busy['tok_s']:,.0f} | "
                  f"{idle['tok_s'] / busy['tok_s']:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(f"autogroup scheduling: {autogroup.read_text().strip() if autogroup.exists() else 'n/a'}")


if __name__ == "__main__":
    main()
