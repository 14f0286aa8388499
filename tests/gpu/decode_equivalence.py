"""The CUDA runner's greedy tokens equal the torch runner's, in fp32 on the GPU (issue 11).

    bash tests/gpu/run_on_device.sh python3 tests/gpu/decode_equivalence.py --out $OUT/decode_equivalence.json
    python tests/gpu/decode_equivalence.py --device cpu --quick      (CPU dry run of the script)

Models: the shipped default model (ssc, learned router), and a random `small` preset (6 layers, 4
heads, dk 48, dv 96: not powers of two) served with ssc (k=2), grm, residual and none at segment
64. Each runs the same prompts (150 to 300 tokens: 2 to 4 cached checkpoints before decoding, more
while decoding) through `LLMEngine` three times: the torch runner (the reference), the CUDA runner
with CUDA graphs, and the CUDA runner with --enforce-eager; fp32 weights, fp32 checkpoints, greedy,
48 tokens each, logprobs of the top 2. The prefill is the same code in all three (fla + Triton on
CUDA); the decode is torch ops vs the fused Triton kernel, so the tokens must match exactly unless
two candidates are tied to fp32 rounding: each divergence is reported with the reference's top-2
logprob gap at that position (a gap below 1e-4 is a tie, anything else is a bug).

What to look at: "identical" per (model, runner) = n/n; "max_logprob_diff" ~1e-5; "ties" empty or
only gaps < 1e-4; "graphs" > 0 for the graph runs (replays happened) and 0 for the eager ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm import LLM
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.model.init_model import build_config, init_weights
from mcserve.server.model.loader import load_model
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

RUNNERS = {"torch": RunnerOptions("torch"), "cuda-graphs": RunnerOptions("cuda"),
           "cuda-eager": RunnerOptions("cuda", enforce_eager=True)}
RANDOM = {"ssc": dict(aggregation="ssc", top_k=2, router="query"), "grm": dict(aggregation="grm", router="query"),
          "residual": dict(aggregation="residual"), "none": dict(aggregation="none")}


def prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(150, 301, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def random_model(aggregation: str, device: torch.device) -> MCGatedDeltaNetForCausalLM:
    cfg = build_config("small", 4096, dict(segment_size=64, **RANDOM[aggregation]))
    model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed=11)
    return model.to(device=device, dtype=torch.float32).eval()


def run(model, tokenizer, runner: RunnerOptions, ps: list[list[int]], max_tokens: int):
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=512,
                       segment_size=model.spec.segment_size, num_state_slots=16, num_checkpoint_blocks=96,
                       enable_prefix_caching=False)
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.float32, seed=0, runner=runner)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    t = time.perf_counter()
    outs = LLM.from_engine(engine).generate(ps, params)
    seconds = time.perf_counter() - t
    graphs = getattr(engine.runner, "graphs", None)
    info = {"seconds": seconds, "graphs": graphs.num_graphs if graphs else 0,
            "replays": graphs.replays if graphs else 0}
    return [o.outputs[0] for o in outs], info


def compare(ref, got) -> dict:
    identical, ties, diff = 0, [], 0.0
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.token_ids == b.token_ids:
            identical += 1
        else:
            j = next(k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y)
            top = a.logprobs[j].top
            gap = top[0][2] - top[1][2] if len(top) > 1 else float("inf")
            ties.append({"sequence": i, "position": j, "ref_top2_gap": gap})
        n = next((k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
                 len(a.token_ids))
        for k in range(n):
            diff = max(diff, abs(a.logprobs[k].logprob - b.logprobs[k].logprob))
    return {"identical": f"{identical}/{len(ref)}", "ties": ties, "max_logprob_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 12 tokens, two models (CPU dry run)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    start = time.perf_counter()
    n, max_tokens = (2, 12) if args.quick else (6, 48)
    tokenizer = Tokenizer.from_dir(default_model_dir())
    models = {"default": lambda: load_model(default_model_dir(), dtype=torch.float32, device=dev)}
    for agg in RANDOM if not args.quick else ("ssc",):
        models[f"small-{agg}"] = lambda agg=agg: random_model(agg, dev)
    results, ok = {}, True
    for name, make in models.items():
        model = make()
        ps = prompts(n, 1, min(model.cfg.vocab_size, tokenizer.vocab_size))
        ref, _ = run(model, tokenizer, RUNNERS["torch"], ps, max_tokens)
        for rname in ("cuda-graphs", "cuda-eager"):
            got, info = run(model, tokenizer, RUNNERS[rname], ps, max_tokens)
            row = {**compare(ref, got), **info}
            bad = [t for t in row["ties"] if t["ref_top2_gap"] >= 1e-4]
            ok &= not bad
            results[f"{name} / {rname}"] = row
            print(f"{name:16s} {rname:12s} identical {row['identical']}, max logprob diff "
                  f"{row['max_logprob_diff']:.2e}, divergences {row['ties']}, graphs {row['graphs']} "
                  f"(replays {row['replays']}), {row['seconds']:.1f} s", flush=True)
        del model
    summary = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "passed": ok, "seconds": time.perf_counter() - start, "results": results}
    print(f"\n{'PASSED' if ok else 'FAILED'}: greedy tokens of the CUDA runner equal the torch runner's "
          f"(divergences only at fp32 ties) in {summary['seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
