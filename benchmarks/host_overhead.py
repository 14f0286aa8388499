"""Host time of one decode step with the device taken out (issue 11): scheduler + CUDA-runner
bookkeeping and the per-row output processing on CPU, for batch x cached checkpoints per row.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py [--batches 64,256,512] [--ckpts 16,64,256]

The real `LLMEngine` with the CUDA runner's code (`RunnerOptions("cuda")`) on a microscopic model
(1 layer, 1 head, dk 8) on CPU. What the device would do is replaced by fakes that cost what a
launch costs the host: the decode step's graph replay returns a fixed logits tensor, the sampler a
token per row from a fixed table of word tokens that changes every step (its one device->host copy
is still made). Every row is put straight into
decoding at `n * C + (i % C)` tokens, i.e. n checkpoints (segment C = 16) with the rows' boundaries
spread over the steps, as in a server (a row crosses a boundary every 16 steps and allocates a block).

`--full-pool`: the steady state of a server whose checkpoint pool has filled up, which the default
run (free blocks, prefix caching off, no router weights) does not reach: prefix caching on, every
block not held by a row holds an idle cached checkpoint (so each boundary evicts one, after the cache
pulls the router weights: `CheckpointCache.weights_source`), and the fake decode step adds router
weight to every block the rows hold, as SSC's reads of a real model do (the 1.3b preset's 21 layers x
6 heads x k = 4 choices per row reach nearly every checkpoint of a row); that add and the
utility's decay are the fake device's only work that grows with the blocks (one launch each on a GPU).

Per configuration, 48 steady steps after 4 warm-up steps (the first step sends every table); columns:
`sched+runner` = `Scheduler.schedule` + `runner.execute` + `Scheduler.update` (the issue's target:
<= 1 ms at B=256 with 64 checkpoints per row, flat in the checkpoints), `alone` = the same three calls
in a bare loop afterwards (no engine work in between), and `engine step` = the whole
`LLMEngine.step` (adds the stop rules, incremental detokenization with the requests' two stop strings
and the deltas, O(1) per row), `+ dispatch` = the engine step plus `AsyncEngine`'s hand-off of its
deltas to the requests' streams (what the server's engine thread does between steps; the event
loop's side runs untimed after each step). The heap is frozen after the warm-up, as the server
freezes it once loaded (a full collection of the unfrozen heap takes ~0.15 s here; `--no-freeze`
leaves it as it is). Median and
fastest step in ms: on a shared machine the median carries the other jobs' preemptions, the fastest
step is what the code costs; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import machine, start_decoding

from mcserve.server.engine.async_engine import AsyncEngine, _Stream
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.device_sampler import DeviceSample
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.model.init_model import build_config
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

C = 16
STEPS, WARMUP = 48, 4


def micro_model(vocab: int) -> MCGatedDeltaNetForCausalLM:
    mc = dict(aggregation="ssc", segment_size=C, top_k=4, router="learned")
    cfg = build_config("tiny", vocab, mc, hidden_size=16, num_hidden_layers=1, num_heads=1, head_dim=8)
    return MCGatedDeltaNetForCausalLM(cfg).eval()


def fake_device(engine: LLMEngine, batch: int, token_ids: list[int], reads: torch.Tensor | None = None) -> None:
    """The runner's device work becomes O(1) host calls: what a CUDA graph replay and the sampler's
    launches cost the host, not what the CPU would take to compute them. Row i samples
    token_ids[(i + step) % len] at the step-th call: text that changes every step. reads: router
    weight per block ([blocks + 1]) that each decode step adds to the runner's utility sums."""
    runner = engine.runner
    logits = torch.zeros(batch, runner.sampler.vocab_size)

    def replay(rows: int, width: int) -> torch.Tensor:
        if reads is not None:
            runner.utility.acc.add_(reads)
        return logits

    runner.graphs.run = replay
    n = len(token_ids)
    table = torch.tensor([[token_ids[(i + j) % n] for i in range(batch + 1)] for j in range(n)], dtype=torch.int64)
    calls = [0]

    def sample(lg: torch.Tensor, rows: torch.Tensor, allowed=None) -> DeviceSample:
        calls[0] += 1
        return DeviceSample(table[calls[0] % n, :lg.shape[0]], None, 0)

    runner.sampler = sample


def streams(engine: LLMEngine, request_ids: list[str]) -> tuple[AsyncEngine, asyncio.AbstractEventLoop]:
    """An AsyncEngine around `engine` (its thread not started) with a stream per request, so that its
    `_dispatch` hands each step's deltas over as in the server (to an event loop that is not run)."""
    loop = asyncio.new_event_loop()
    front = AsyncEngine(engine, start=False)
    for rid in request_ids:
        front._streams[rid] = _Stream(loop, 1)
        front._open[rid] = {0}
    return front, loop


def consume(loop: asyncio.AbstractEventLoop, front: AsyncEngine) -> None:
    """What the server's event loop does with a step's deltas (untimed: not the engine thread's work):
    run the hand-off and empty the streams, so nothing piles up in the heap from step to step."""
    loop.call_soon(loop.stop)
    loop.run_forever()
    for stream in front._streams.values():
        while not stream.queue.empty():
            stream.queue.get_nowait()


def timed(engine: LLMEngine) -> dict[str, float]:
    """Time the scheduler's and the runner's calls inside one engine step."""
    sched, runner = engine.scheduler, engine.runner
    spent = {"sched+runner": 0.0}

    def wrap(obj, name):
        inner = getattr(obj, name)

        def call(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent["sched+runner"] += time.perf_counter() - t

        setattr(obj, name, call)

    wrap(sched, "schedule"), wrap(sched, "update"), wrap(runner, "execute")
    return spent


def fill_with_idle(engine: LLMEngine, blocks: int) -> None:
    """`blocks` idle cached checkpoints (indexed, held by nothing: what finished requests leave behind)."""
    cache = engine.scheduler.cache
    for g in range(blocks):
        ghost = -1 - g  # a seq id no request has
        assert cache.allocate(ghost, evict_running=False)
        cache.register(ghost, 0, b"idle-%d" % g, b"")
        cache.release(ghost)


def held_reads(engine: LLMEngine) -> torch.Tensor:
    """[blocks + 1] a small router weight on every block a running sequence holds."""
    cache, reads = engine.scheduler.cache, torch.zeros(engine.runner.utility.acc.shape)
    held = [b for s in engine.scheduler.running for b in cache.block_ids(s.seq_id, 0, cache.table_len(s.seq_id))]
    reads[held] = 1e-3
    return reads


def run(tokenizer: Tokenizer, model, batch: int, ckpts: int, freeze: bool = True, full_pool: bool = False) -> dict:
    max_len = (ckpts + 2) * C + 2 * STEPS + WARMUP + 8
    idle = batch * ((WARMUP + 2 * STEPS) // C + 2) if full_pool else 0  # more than every boundary to come takes
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch), max_model_len=max_len,
                       segment_size=C, num_state_slots=batch,
                       num_checkpoint_blocks=batch * ckpts + idle if full_pool else batch * (ckpts + 6),
                       enable_prefix_caching=full_pool)
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.float32, seed=0, runner=RunnerOptions("cuda"))
    # text tokens, so that the detokenizer takes its usual path (a random id is often a partial character)
    words = tokenizer.encode(" one two three four five six seven eight nine ten, and then: more words.")
    params = SamplingParams(temperature=0.0, max_tokens=2 * STEPS + WARMUP + 4, ignore_eos=True,
                            stop=("\n\n", "User:"))  # never in the text: checked, never hit
    prompts = [[words[j % len(words)] for j in range(ckpts * C + i % C + 1)] for i in range(batch)]
    request_ids = start_decoding(engine, prompts, params)
    if full_pool:
        fill_with_idle(engine, idle)
        assert engine.scheduler.cache.num_free_blocks == 0
    fake_device(engine, batch, words, held_reads(engine) if full_pool else None)
    front, loop = streams(engine, request_ids)
    for _ in range(WARMUP):
        engine.step()
    if freeze:
        gc.collect()
        gc.freeze()  # as the server does once it has loaded (cli.py: load_engine)
    spent = timed(engine)
    engine_ms, host_ms, dispatch_ms = [], [], []
    for _ in range(STEPS):
        spent["sched+runner"] = 0.0
        t = time.perf_counter()
        deltas = engine.step()
        engine_ms.append((time.perf_counter() - t) * 1e3)
        front._dispatch(deltas)
        dispatch_ms.append((time.perf_counter() - t) * 1e3)
        host_ms.append(spent["sched+runner"] * 1e3)
        assert len(deltas) == batch and all(d.text and d.finish_reason is None for d in deltas), deltas[:2]
        consume(loop, front)
    loop.close()
    assert engine.runner.staging.num_sends <= WARMUP + STEPS
    if full_pool:
        assert engine.scheduler.cache.counters["evict_idle"] >= batch * (WARMUP + STEPS) // C - batch
        assert engine.scheduler.cache.num_free_blocks == 0
    # the same three calls in a bare loop, without the engine's per-token work in between (whose
    # allocations and cache traffic slow them down inside the engine's step)
    sched, runner, alone = engine.scheduler, engine.runner, []
    for _ in range(STEPS):
        t = time.perf_counter()
        plan = sched.schedule()
        sched.update(plan, runner.execute(plan, engine._sampling_rows(plan)).step)
        alone.append((time.perf_counter() - t) * 1e3)
    gc.unfreeze()
    return {"batch": batch, "ckpts_per_row": ckpts, "sched_runner_ms": statistics.median(host_ms),
            "sched_runner_ms_min": min(host_ms), "engine_step_ms": statistics.median(engine_ms),
            "engine_step_ms_min": min(engine_ms), "dispatch_ms": statistics.median(dispatch_ms),
            "dispatch_ms_min": min(dispatch_ms), "alone_ms": statistics.median(alone), "alone_ms_min": min(alone)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256,512")
    ap.add_argument("--ckpts", default="16,64,256")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--no-freeze", action="store_true", help="leave the heap unfrozen (full collections walk it all)")
    ap.add_argument("--full-pool", action="store_true",
                    help="prefix caching on, the pool full of idle cached checkpoints, router weight on held blocks")
    args = ap.parse_args()
    tokenizer = Tokenizer.from_dir(default_model_dir())
    model = micro_model(tokenizer.vocab_size)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"segment {C}, {STEPS} steps after {WARMUP} warm-up steps, ms per decode step"
          f"{', full pool' if args.full_pool else ''}\n")
    print("| batch | ckpts per row | sched+runner ms, median | fastest | alone, median | fastest "
          "| engine step ms, median | fastest | + dispatch, median | fastest |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for n in (int(x) for x in args.ckpts.split(",")):
            r = run(tokenizer, model, b, n, freeze=not args.no_freeze, full_pool=args.full_pool)
            rows.append(r)
            print(f"| {b} | {n} | {r['sched_runner_ms']:.2f} | {r['sched_runner_ms_min']:.2f} | "
                  f"{r['alone_ms']:.2f} | {r['alone_ms_min']:.2f} | "
                  f"{r['engine_step_ms']:.2f} | {r['engine_step_ms_min']:.2f} | "
                  f"{r['dispatch_ms']:.2f} | {r['dispatch_ms_min']:.2f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine(), "full_pool": args.full_pool, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
