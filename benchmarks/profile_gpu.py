"""Where the GPU time of a decode step and of a prefill goes: torch.profiler kernel tables.

    bash tests/gpu/run_on_device.sh python3 benchmarks/profile_gpu.py --out $OUT/profile   (carry .whl)

Not a throughput benchmark (decode_engine.py and prefill.py are): a guide for what to fuse next.
The set-up is theirs (random 1.3b preset, bf16, 1,100-token prompts, segment 256, ssc with k = 4 and
the query router). Written to --out, one text file per part, each as soon as it is measured:
- decode.txt: per (aggregation, B in --decode-batches) the CUDA runner's decode graph replayed
  `--reps` times under the profiler (kernels inside a graph are traced by CUPTI), then the same
  number of eager steps of the engine (`--enforce-eager`), top kernels by total CUDA time, with the
  kernel count per step;
- prefill.txt: per (path, B in --prefill-batches) one `model.prefill_batch` of B prompts (none,
  ssc k=4) and fla's model forward on the same prompts, top kernels by total CUDA time.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from common import fill_pools, machine, start_decoding
from decode_engine import AGGREGATIONS, make_model
from prefill import build_model, fla_prefill, make_fla, mcserve_prefill, select_kernels, use_spec

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.text.tokenizer import Tokenizer

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def table(fn, reps: int, label: str, rows: int) -> str:
    """Top kernels of `reps` calls of `fn` (after one warm-up call) by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.end - e.time_range.start for e in kernels)
    head = (f"== {label}: {len(kernels) / reps:.0f} kernels per call, {total_us / reps / 1e3:.3f} ms of kernel "
            f"time per call (sum over kernels)")
    return head + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def decode_engine(model, tokenizer, batch: int, prompt_len: int, eager: bool) -> LLMEngine:
    C = model.spec.segment_size
    n_ckpt = (prompt_len - 1) // C
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch), max_model_len=prompt_len + 256,
                       segment_size=C, num_state_slots=batch, num_checkpoint_blocks=batch * n_ckpt + 16,
                       enable_prefix_caching=False)
    cuda = model.device.type == "cuda"
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.bfloat16 if cuda else None, seed=0,
                       runner=RunnerOptions("auto" if cuda else "cuda", enforce_eager=eager,
                                            cuda_graph_sizes=(batch,)))
    fill_pools(engine.runner)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, engine.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    start_decoding(engine, prompts, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    return engine


def profile_decode(args, tokenizer, device, out: Path | None, rows: int) -> None:
    parts = []
    for agg in args.aggregations.split(","):
        model = make_model(args.preset, args.segment, AGGREGATIONS[agg], args.vocab, device)
        for b in (int(x) for x in args.decode_batches.split(",")):
            engine = decode_engine(model, tokenizer, b, args.prompt_len, eager=False)
            runner = engine.runner
            if runner.graphs.num_graphs:
                width = runner.batch.table_width
                parts.append(table(lambda r=runner, b=b, w=width: r.graphs.run(b, w), args.reps,
                                   f"decode graph replay, {agg}, B={b}", rows))
                say(parts[-1].splitlines()[0])
            del engine, runner
            gc.collect()
            torch.cuda.empty_cache()
            engine = decode_engine(model, tokenizer, b, args.prompt_len, eager=True)
            parts.append(table(engine.step, args.reps, f"decode eager engine step, {agg}, B={b}", rows))
            say(parts[-1].splitlines()[0])
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            if out:
                (out / "decode.txt").write_text("\n\n".join(parts) + "\n")
        del model
        gc.collect()


def profile_prefill(args, device, out: Path | None, rows: int) -> None:
    dtype = torch.bfloat16
    model = build_model(args.preset, args.segment, device, dtype)
    kernels = select_kernels(device, model.spec, dtype)
    fla_model = None
    try:
        fla_model = make_fla(args.preset, device, dtype)
    except Exception as e:  # the comparison is an extra
        say(f"fla model: {e!r}")
    g = torch.Generator().manual_seed(0)
    parts = []
    for b in (int(x) for x in args.prefill_batches.split(",")):
        prompts = torch.randint(3, model.cfg.vocab_size, (b, args.prompt_len), generator=g)
        for name, spec in {"none": MCSpec("none", args.segment),
                           "ssc k=4": MCSpec("ssc", args.segment, top_k=4)}.items():
            use_spec(model, spec)
            parts.append(table(mcserve_prefill(model, prompts, kernels), 1, f"mcserve prefill {name}, B={b}", rows))
            say(parts[-1].splitlines()[0])
        if fla_model is not None:
            parts.append(table(fla_prefill(fla_model, prompts), 1, f"fla prefill, B={b}", rows))
            say(parts[-1].splitlines()[0])
        if out:
            (out / "prefill.txt").write_text("\n\n".join(parts) + "\n")
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-batches", default="1,64")
    ap.add_argument("--prefill-batches", default="16")
    ap.add_argument("--aggregations", default="none,ssc k=4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--parts", default="decode,prefill")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("profile_gpu.py profiles CUDA kernels: run it on a GPU")
    args.preset, args.segment, args.prompt_len, args.vocab = "1.3b", 256, 1100, 32000
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    say(machine())
    parts = args.parts.split(",")
    if "decode" in parts:
        profile_decode(args, Tokenizer.from_dir(default_model_dir()), device, out, args.rows)
    if "prefill" in parts:
        profile_prefill(args, device, out, args.rows)


if __name__ == "__main__":
    main()
