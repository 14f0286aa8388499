"""Tensor parallelism on GPUs: the same greedy tokens at TP=2 (and 4) as at TP=1 on the 1.3b preset,
then decode throughput and per-GPU memory at TP=1, 2, 4 for B = 64 and 256.

Needs a machine of 2+ GPUs (nvidia-h200-x2 / -x4). Writes a random 1.3b checkpoint (fp32, ~5.6 GB)
to --model-dir unless one is there, then, per tensor-parallel size that fits the visible GPUs:

- same tokens: fp32 weights and checkpoints, the torch runner's stages at every size, greedy, 8
  prompts of 300 tokens (one cached segment of 256 before decoding) x 64 tokens; how many sequences
  are identical to TP=1 and the first position where each differs. All-reduces sum in another order
  than one matmul, so an fp32 divergence late in a random model's greedy run is rounding, not a bug;
  the script also reports the largest difference of the chosen tokens' logprobs before it.
- throughput: bf16 (the serving default), B prompts of 128 tokens x 128 output tokens, prefix
  caching off, after a warm-up: output tokens per second and ms per step. TP=1 twice: with the
  torch runner (the stages each rank runs) and with the default runner (on CUDA the CUDA runner,
  which tensor parallelism does not use yet).
- memory: each GPU's used memory (NVML: no CUDA context of ours on the other GPUs) at the end of
  the timed run. The checkpoint pool is 16 GiB / N per GPU (--pool-gib), the same blocks at every N.

    bash tests/gpu/run_on_device.sh python3 tests/gpu/tp_check.py --out $OUT/tp_check.json

A dry run of the script's own logic on CPU (gloo, the tiny preset, no memory readings):

    python tests/gpu/tp_check.py --device cpu --preset tiny --model-dir /tmp/tp-tiny --sizes 1,2 \
        --batches 4 --pool-gib 0.01
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.tp.group import MULTICAST_OFF, keep_multicast_off
from mcserve.server.model.init_model import init_model
from mcserve.server.text.tokenizer import Tokenizer

VOCAB = [8000]  # prompt token ids are drawn below this (set from the tokenizer in main)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, VOCAB[0], (n, length), generator=g).tolist()


def gpu_memory_used() -> list[int]:
    """Bytes used on every GPU of the host, as NVML sees them (every process's)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(llm: LLM) -> None:
    llm.engine.close()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same_tokens(model_dir: Path, sizes: list[int], device: str) -> dict:
    check = prompts(8, 300, 0)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=0)
    runs = {}
    for tp in sizes:
        llm = LLM(model_dir, device=device, dtype="float32", ckpt_dtype="float32", max_num_seqs=8,
                  checkpoint_memory=4 * 2**30, tensor_parallel_size=tp, runner="torch")
        outs = llm.generate(check, greedy)
        runs[tp] = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]
        release(llm)
    report = {}
    for tp in sizes[1:]:
        first, worst = [], 0.0
        for (a, la), (b, lb) in zip(runs[1], runs[tp], strict=True):
            d = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            first.append(d)
            upto = len(a) if d is None else d
            worst = max([worst] + [abs(x - y) for x, y in zip(la[:upto], lb[:upto], strict=True)])
        same = sum(d is None for d in first)
        report[f"tp{tp}"] = {"identical": f"{same}/{len(check)}", "first_divergence": first,
                             "max_logprob_diff_before_divergence": worst}
        print(f"greedy fp32 TP={tp} vs TP=1: {same}/{len(check)} identical; first divergence {first}; "
              f"max |logprob diff| before it {worst:.2e}", flush=True)
    return report


def throughput(model_dir: Path, sizes: list[int], batches: list[int], device: str, pool_bytes: int) -> list[dict]:
    rows = []
    gen = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    # TP=1 twice: the torch runner (the stages every tensor-parallel rank runs) and the default
    # runner (on CUDA the CUDA runner: graphs, Triton decode), which TP does not use yet
    runs = [(1, "torch"), *((1, "auto") for _ in [0] if device == "cuda"), *((tp, "torch") for tp in sizes[1:])]
    for tp, runner in runs:
        for b in batches:
            llm = LLM(model_dir, device=device, tensor_parallel_size=tp, max_num_seqs=b,
                      max_num_batched_tokens=max(2048, 128 * b), enable_prefix_caching=False,
                      checkpoint_memory=pool_bytes // tp, runner=runner)
            llm.generate(prompts(b, 128, 1), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
            sync(device)
            steps0 = llm.engine.counters["steps"]
            t = time.perf_counter()
            outs = llm.generate(prompts(b, 128, 2), gen)
            sync(device)
            wall = time.perf_counter() - t
            steps = llm.engine.counters["steps"] - steps0
            used = gpu_memory_used() if device == "cuda" else []
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            row = dict(tp=tp, runner=type(llm.engine.runner).__name__, batch=b, output_tokens=n_out, wall_s=wall,
                       output_tok_s=n_out / wall, steps=steps,
                       ms_per_step=1000 * wall / steps, gpu_memory_used_gib=[round(u / 2**30, 2) for u in used[:tp]],
                       pools=llm.engine.scheduler.config.num_checkpoint_blocks)
            rows.append(row)
            print(f"TP={tp} {row['runner']:16s} B={b:4d}: {n_out / wall:9.0f} output tok/s, "
                  f"{row['ms_per_step']:6.1f} ms/step, "
                  f"GPU memory used {row['gpu_memory_used_gib']} GiB, {row['pools']} checkpoint blocks", flush=True)
            release(llm)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--model-dir", default="/tmp/mcserve-1.3b")
    ap.add_argument("--sizes", default="1,2,4", help="tensor-parallel sizes (those beyond the GPUs are skipped)")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the script")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--pool-gib", type=float, default=16.0, help="checkpoint pool of the throughput runs, all GPUs")
    args = ap.parse_args()
    keep_multicast_off()
    assert all(os.environ[k] == v for k, v in MULTICAST_OFF.items())
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    sizes = [n for n in (int(x) for x in args.sizes.split(",")) if n <= gpus]
    assert sizes[0] == 1 and len(sizes) > 1, f"needs 2+ GPUs, {gpus} visible"
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        init_model(model_dir, preset=args.preset, mc={"aggregation": "ssc", "top_k": 2}, seed=0)
        print(f"wrote the {args.preset} preset to {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    VOCAB[0] = min(VOCAB[0], Tokenizer.from_dir(model_dir).vocab_size)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    info = {"device": name, "gpus": gpus, "torch": torch.__version__,
            "model": f"{args.preset} preset, random weights, ssc top_k 2", "multicast_env": dict(MULTICAST_OFF)}
    info["same_tokens"] = same_tokens(model_dir, sizes, args.device)
    info["throughput"] = throughput(model_dir, sizes, [int(x) for x in args.batches.split(",")], args.device,
                                    int(args.pool_gib * 2**30))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
