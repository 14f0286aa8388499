"""Offline throughput of the engine (LLM.generate) for batch sizes 1..64.

    python benchmarks/offline_throughput.py [--model DIR] [--preset tiny] [--device cpu]

Each batch size runs `batch` requests at once (max_num_seqs = batch) with random prompts of
--prompt-len tokens and greedy outputs of exactly --output-len tokens (ignore_eos), after one
warm-up run; each row is the median of --repeats runs. Prints a markdown table: output tokens/s,
total (prompt + output) tokens/s, and the mean time of an engine step.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, model_dir

from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams


def run(llm: LLM, batch: int, prompt_len: int, output_len: int, seed: int) -> tuple[float, int, int, int]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, llm.engine.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    steps0 = llm.engine.counters["steps"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == batch * output_len, generated
    return elapsed, generated, batch * prompt_len, llm.engine.counters["steps"] - steps0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    path = model_dir(args.model, args.preset)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"model: {path} ({args.preset} preset unless --model), device {args.device}")
    print(f"machine: {machine()}")
    print(f"prompt {args.prompt_len} tokens, output {args.output_len} tokens (greedy, ignore_eos), "
          f"median of {args.repeats} runs\n")
    print("| batch | output tok/s | total tok/s | wall s | steps | ms/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in sizes:
        llm = LLM(path, device=args.device, max_num_seqs=batch, max_model_len=args.prompt_len + args.output_len + 1,
                  enable_prefix_caching=False)
        run(llm, batch, args.prompt_len, min(args.output_len, 8), seed=1)  # warm-up
        runs = [run(llm, batch, args.prompt_len, args.output_len, seed=2 + r) for r in range(args.repeats)]
        elapsed, generated, prompt_tokens, steps = sorted(runs)[len(runs) // 2]  # the median by wall time
        print(f"| {batch} | {generated / elapsed:,.0f} | {(generated + prompt_tokens) / elapsed:,.0f} | "
              f"{elapsed:.2f} | {steps} | {1000 * elapsed / steps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
