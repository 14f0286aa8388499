"""The CUDA runner's greedy tokens equal the torch runner's, in fp32 on the GPU (issue 11).

    bash tests/gpu/run_on_device.sh python3 tests/gpu/decode_equivalence.py --out $OUT/decode_equivalence.json
    python tests/gpu/decode_equivalence.py --device cpu --quick      (CPU dry run of the script)

Models: the shipped default model (ssc, learned router), and a random `small` preset (6 layers, 4
heads, dk 48, dv 96: not powers of two) served with ssc (k=2), none, grm and residual at segment
64. Each runs the same prompts (150 to 300 tokens: 2 to 4 cached checkpoints before decoding, more
while decoding) through `LLMEngine` four times: the torch runner (the reference), the CUDA runner
with CUDA graphs (batch bucket 8: the 6 rows run padded), the CUDA runner with --enforce-eager, and
the CUDA runner with graphs and async scheduling (step n+1 launched before step n is collected);
fp32 weights, fp32 checkpoints, greedy, 48 tokens each, logprobs of the top 2. The prefill is the
same code in all three (fla + Triton on CUDA); the decode is torch ops vs the fused Triton kernel,
so the tokens must match exactly unless two candidates are tied to fp32 rounding: each divergence is
reported with the reference's top-2 logprob gap at that position (a gap below 1e-4 is a tie,
anything else is a bug).

fp32 flags: the TF32 and reduced-precision-reduction flags are printed as found (after the imports:
something may have set them) and pinned off for every comparison ("strict"). The shipped model runs
twice more, for information (outside the verdict): the torch runner again (a nonzero difference to
its first run means the GPU path is not deterministic: atomics, or fla's autotuned kernels), and
with TF32 on for cuBLAS and cuDNN ("tf32": the torch runner and the CUDA runner with graphs,
compared with each other, and the torch runner with TF32 against the strict one: what TF32 alone
does to the reference). What fp32 rounding alone gives, on CPU: the shipped model's fp32 torch
runner vs its fp64 run, 1e-6 max logprob difference; the Triton decode path and glue under
TRITON_INTERPRET=1 vs the torch path, ~2e-7 on one step's logits.

Budget: the rows run in the order above and a model whose turn comes after --budget seconds is
skipped (reported); the JSON is written after every model. Per run it records the engine build time
(CUDA graph capture included) and the generate time, so a slow run shows where its time went.

What to look at: "identical" per (model, runner) = n/n; "max_logprob_diff" of the strict rows ~1e-6
(verdict "logprobs within 1e-4"); "ties" empty or only gaps < 1e-4; "graphs" > 0 for the graph runs
(replays happened) and 0 for the eager ones; "async" true only for the -async rows (the others are
explicitly serial: async is the CUDA runner's default on a GPU); "flags_as_found"; the tf32 rows
against the strict ones.
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

# Async scheduling is the CUDA runner's default on a GPU: every row says which it runs.
RUNNERS = {"torch": RunnerOptions("torch", async_scheduling=False),
           "cuda-graphs": RunnerOptions("cuda", cuda_graph_sizes=(8,), async_scheduling=False),
           "cuda-eager": RunnerOptions("cuda", enforce_eager=True, async_scheduling=False),
           "cuda-graphs-async": RunnerOptions("cuda", cuda_graph_sizes=(8,), async_scheduling=True)}
RANDOM = {"ssc": dict(aggregation="ssc", top_k=2, router="query"), "none": dict(aggregation="none"),
          "grm": dict(aggregation="grm", router="query"), "residual": dict(aggregation="residual")}
TIE, LOGPROB_LIMIT = 1e-4, 1e-4


def flags() -> dict:
    m = torch.backends.cuda.matmul
    return {"cuda.matmul.allow_tf32": m.allow_tf32, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "allow_fp16_reduced_precision_reduction": m.allow_fp16_reduced_precision_reduction,
            "allow_bf16_reduced_precision_reduction": m.allow_bf16_reduced_precision_reduction}


def pin(tf32: bool) -> None:
    """TF32 for cuBLAS and cuDNN on or off (float32_matmul_precision follows allow_tf32); fp16/bf16
    reduced-precision reductions off (they do not touch fp32 GEMMs; pinned so the flags are known)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


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
    t = time.perf_counter()
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.float32, seed=0, runner=runner)
    build = time.perf_counter() - t
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    t = time.perf_counter()
    outs = LLM.from_engine(engine).generate(ps, params)
    seconds = time.perf_counter() - t
    graphs = getattr(engine.runner, "graphs", None)
    info = {"build_s": build, "generate_s": seconds, "graphs": graphs.num_graphs if graphs else 0,
            "replays": graphs.replays if graphs else 0, "async": engine.pipeline is not None}
    assert info["async"] == runner.async_scheduling, (runner, info)  # the row ran the mode it is named for
    engine.close()
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


def check(results: dict, key: str, ref, got, info: dict | None) -> bool:
    """One comparison row, printed and stored; True when its divergences are all ties."""
    row = {**compare(ref, got), **(info or {})}
    results[key] = row
    bad = [t for t in row["ties"] if t["ref_top2_gap"] >= TIE]
    extra = f", graphs {row['graphs']} (replays {row['replays']}), async {row['async']}, build " \
        f"{row['build_s']:.1f} s, generate {row['generate_s']:.1f} s" if info else ""
    print(f"{key:40s} identical {row['identical']}, max logprob diff {row['max_logprob_diff']:.2e}, "
          f"divergences {row['ties']}{extra}", flush=True)
    return not bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 12 tokens, two models (CPU dry run)")
    ap.add_argument("--budget", type=float, default=130.0, help="seconds after which no further model starts")
    args = ap.parse_args()
    dev = torch.device(args.device)
    start = time.perf_counter()
    n, max_tokens = (2, 12) if args.quick else (6, 48)
    tokenizer = Tokenizer.from_dir(default_model_dir())
    as_found = flags()
    print(f"fp32 flags as found: {as_found}", flush=True)
    models = {"default": lambda: load_model(default_model_dir(), dtype=torch.float32, device=dev)}
    for agg in RANDOM if not args.quick else ("ssc",):
        models[f"small-{agg}"] = lambda agg=agg: random_model(agg, dev)
    results: dict = {}
    summary = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "flags_as_found": as_found, "flags_strict": None, "results": results, "skipped": []}
    ok = logprobs_ok = True
    for name, make in models.items():
        if time.perf_counter() - start > args.budget:
            summary["skipped"].append(name)
            print(f"{name}: skipped (past the {args.budget:.0f} s budget)", flush=True)
            continue
        pin(tf32=False)
        summary["flags_strict"] = flags()
        t = time.perf_counter()
        model = make()
        ps = prompts(n, 1, min(model.cfg.vocab_size, tokenizer.vocab_size))
        ref, ref_info = run(model, tokenizer, RUNNERS["torch"], ps, max_tokens)
        print(f"{name}: model {time.perf_counter() - t - ref_info['build_s'] - ref_info['generate_s']:.1f} s, "
              f"torch runner build {ref_info['build_s']:.1f} s, generate {ref_info['generate_s']:.1f} s", flush=True)
        for rname in ("cuda-graphs", "cuda-eager", "cuda-graphs-async"):
            got, info = run(model, tokenizer, RUNNERS[rname], ps, max_tokens)
            ok &= check(results, f"{name} / {rname}", ref, got, info)
            logprobs_ok &= results[f"{name} / {rname}"]["max_logprob_diff"] < LOGPROB_LIMIT
        if name == "default":  # the reference against itself (is the GPU path deterministic?), then TF32
            again, _ = run(model, tokenizer, RUNNERS["torch"], ps, max_tokens)
            check(results, "default / torch again vs torch", ref, again, None)
            pin(tf32=True)
            ref32, _ = run(model, tokenizer, RUNNERS["torch"], ps, max_tokens)
            got32, info = run(model, tokenizer, RUNNERS["cuda-graphs"], ps, max_tokens)
            pin(tf32=False)
            # for information: TF32's own error may exceed the tie threshold
            check(results, "default / torch tf32 vs torch strict", ref, ref32, None)
            check(results, "default / cuda-graphs tf32 vs torch tf32", ref32, got32, info)
        del model
        summary.update(passed=ok, logprobs_within_limit=logprobs_ok, seconds=time.perf_counter() - start)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=1))
    summary.update(passed=ok, logprobs_within_limit=logprobs_ok, seconds=time.perf_counter() - start)
    print(f"\n{'PASSED' if ok else 'FAILED'}: greedy tokens of the CUDA runner equal the torch runner's "
          f"(divergences only at fp32 ties) in {summary['seconds']:.0f} s; strict-fp32 logprobs "
          f"{'within' if logprobs_ok else 'NOT within'} {LOGPROB_LIMIT:g}; skipped: {summary['skipped'] or 'none'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
