"""The engine on CUDA: same greedy tokens as on the CPU, and decode throughput by batch size.

Runs the shipped default model through `LLM.generate` (scheduler, runner, pools, sampler) on the
GPU in fp32 with fp32 checkpoints, checks the greedy tokens against the same engine on the CPU,
then in bf16 (the serving default on CUDA) times offline generation at several batch sizes, with the
runner passing the boundary rows and SSC's largest k from the host ("host-known") and with the
model deriving them on the device ("device-derived": a device sync every step). The
torch paths only (no Triton kernels yet): this measures the eager reference path, not a fast one.

    python tests/gpu/engine_smoke.py --out engine_smoke.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 8000, (n, length), generator=g).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8,64,256")
    args = ap.parse_args()
    model_dir = default_model_dir()
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    check = prompts(6, 150, 0)  # 150 tokens: two cached segments of 64 before decoding starts
    runs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model_dir, device=device, dtype="float32", ckpt_dtype="float32", max_num_seqs=8)
        runs[device] = [o.outputs[0].token_ids for o in llm.generate(check, greedy)]
        del llm
    same = sum(a == b for a, b in zip(runs["cpu"], runs["cuda"], strict=True))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
                  for a, b in zip(runs["cpu"], runs["cuda"], strict=True)]
    print(f"greedy fp32 cuda vs cpu: {same}/{len(check)} sequences identical; first divergence {first_diff}")

    rows = []
    gen = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    for b in [int(x) for x in args.batches.split(",")]:
        for variant in ("host-known", "device-derived"):
            llm = LLM(model_dir, device="cuda", max_num_seqs=b, max_num_batched_tokens=max(2048, 128 * b),
                      enable_prefix_caching=False)
            if variant == "device-derived":  # the runner's old behaviour: the kernel finds them (syncs)
                model = llm.engine.runner.model
                plain = model.decode
                model.decode = lambda *a, write_rows=None, top_k_max=None, _f=plain, **k: _f(*a, **k)
            llm.generate(prompts(b, 128, 1), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts(b, 128, 2), gen)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append(dict(batch=b, variant=variant, output_tokens=n_out, wall_s=wall,
                             output_tok_s=n_out / wall, ms_per_step=1000 * wall / 128))
            print(f"batch {b:4d} {variant:14s}: {n_out / wall:9.0f} output tok/s, {1000 * wall / 128:6.1f} ms/step",
                  flush=True)
            del llm
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": str(model_dir),
            "greedy_identical": f"{same}/{len(check)}", "first_divergence": first_diff, "throughput": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
