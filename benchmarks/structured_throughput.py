"""Decode throughput with a JSON schema active vs none, so the grammar's cost per token is known.

    OMP_NUM_THREADS=1 python benchmarks/structured_throughput.py [--model DIR] [--batch-sizes 1,64]

Both runs generate exactly --output-len greedy tokens per sequence (ignore_eos) from the same random
prompts, with the same logit_bias: every token containing "]" gets -100, so the guided output, a
JSON array of strings (`{"type": "array", "items": {"type": "string"}}`), can never close and
runs to max_tokens. Inside a string nearly the whole vocabulary is allowed, the costly case for a
token mask (the whole token trie is walked). Each row is the median of --repeats runs after a
warm-up. Besides wall-clock throughput (which a shared machine's neighbours move by tens of
percent), it reports the CPU time per step of the engine thread (the step loop, on this thread:
what the grammar adds to the critical path) and of all threads (the mask worker included), and the
engine thread's time blocked on the worker ("mask wait": what the overlap did not hide).

Last, the grammar's own share of the engine thread, measured inside the guided runs themselves (so
the machine's load scales both sides alike): the thread CPU time spent in `TokenMasks.launch`,
`bitmask`, `accept` and the sampler's mask application, against the thread CPU time per step of the
same runs. That ratio is the cost the grammar adds to the critical path.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from common import machine, model_dir

from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.structured.spec import StructuredSpec

SCHEMA = {"type": "array", "items": {"type": "string"}}


class GrammarClock:
    """Engine-thread CPU time inside the grammar's calls, by call, while `on`."""

    def __init__(self, llm: LLM) -> None:
        self.seconds: Counter[str] = Counter()
        self.on = False
        masks, sampler = llm.engine.masks, llm.engine.runner.sampler
        for name in ("launch", "bitmask", "accept"):
            setattr(masks, name, self._timed(name, getattr(masks, name)))
        sampler._mask = self._timed("apply", sampler._mask)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start

        return timed


def run(llm: LLM, batch: int, prompt_len: int, output_len: int, params: SamplingParams, seed: int
        ) -> tuple[float, int, int, float, float, float]:
    """(wall s, tokens, steps, mask wait s, engine-thread CPU s, process CPU s)"""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, llm.engine.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = llm.engine
    steps0, wait0 = engine.counters["steps"], engine.masks.wait_s
    start, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    outs = llm.generate(prompts, params)  # the engine loop runs on this thread
    elapsed = time.perf_counter() - start
    cpu, proc = time.thread_time() - cpu0, time.process_time() - proc0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == batch * output_len, generated
    if params.structured is not None:
        assert all(o.outputs[0].text.startswith("[") for o in outs), outs[0].outputs[0].text
        json.loads(outs[0].outputs[0].text[:1] + "]")  # the guided text opens a JSON array
    return elapsed, generated, engine.counters["steps"] - steps0, engine.masks.wait_s - wait0, cpu, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    path = model_dir(args.model, args.preset)
    print(f"model: {path} ({args.preset} preset unless --model), device {args.device}")
    print(f"machine: {machine()}")
    print(f"prompt {args.prompt_len} tokens, output {args.output_len} tokens (greedy, ignore_eos), "
          f"median of {args.repeats} runs; schema {json.dumps(SCHEMA)}\n")
    print("| batch | none tok/s | schema tok/s | wall cost | engine-thread CPU ms/step none / schema | CPU cost | "
          "all threads CPU ms/step none / schema | mask wait ms/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    shares = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        llm = LLM(path, device=args.device, max_num_seqs=batch, max_model_len=args.prompt_len + args.output_len + 1,
                  enable_prefix_caching=False)
        clock = GrammarClock(llm)
        tok = llm.engine.tokenizer
        bias = {t: -100.0 for t in range(llm.engine.vocab_size) if "]" in tok.decode([t], skip_special_tokens=False)}
        free = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, logit_bias=bias)
        guided = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, logit_bias=bias,
                                structured=StructuredSpec.json_schema(SCHEMA, "bench"))
        rows = {}
        for params in (free, guided):  # warm-up
            run(llm, batch, args.prompt_len, 8, dataclasses.replace(params, max_tokens=8), seed=1)
        # Interleaved, so a neighbour's load on the machine hits both alike.
        runs: dict[str, list] = {"none": [], "schema": []}
        for r in range(args.repeats):
            for name, params in (("none", free), ("schema", guided)):
                clock.on = name == "schema"
                runs[name].append(run(llm, batch, args.prompt_len, args.output_len, params, seed=2 + r))
        clock.on = False
        steps = sum(r[2] for r in runs["schema"])
        cpu = sum(r[4] for r in runs["schema"])
        shares.append((batch, {k: 1000 * v / steps for k, v in clock.seconds.items()}, 1000 * cpu / steps))
        for name in runs:
            rows[name] = sorted(runs[name])[len(runs[name]) // 2]
        (t0, n0, _, _, _, _), (t1, n1, s1, w1, _, _) = rows["none"], rows["schema"]
        # CPU per step as the median over runs (less sensitive to neighbours than wall time)
        c0 = sorted(r[4] / r[2] for r in runs["none"])[len(runs["none"]) // 2]
        c1 = sorted(r[4] / r[2] for r in runs["schema"])[len(runs["schema"]) // 2]
        p0 = sorted(r[5] / r[2] for r in runs["none"])[len(runs["none"]) // 2]
        p1 = sorted(r[5] / r[2] for r in runs["schema"])[len(runs["schema"]) // 2]
        cost = (n0 / t0) / (n1 / t1) - 1
        print(f"| {batch} | {n0 / t0:,.0f} | {n1 / t1:,.0f} | {100 * cost:+.1f}% | {1000 * c0:.2f} / {1000 * c1:.2f} | "
              f"{100 * (c1 / c0 - 1):+.1f}% | {1000 * p0:.2f} / {1000 * p1:.2f} | {1000 * w1 / s1:.3f} |", flush=True)
    print("\nThe grammar's share of the engine thread in the guided runs (CPU ms per step):\n")
    print("| batch | launch | bitmask | accept | apply in sampler | grammar total | engine thread | share |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, parts, per_step in shares:
        total = sum(parts.values())
        print(f"| {batch} | " + " | ".join(f"{parts.get(k, 0.0):.3f}" for k in ("launch", "bitmask", "accept", "apply"))
              + f" | {total:.3f} | {per_step:.2f} | {100 * total / per_step:.1f}% |")


if __name__ == "__main__":
    main()
