"""The engine's decode step on the GPU (issue 11's table): ms per step, tokens/s, the roofline from a
device copy measured in the same run, the fraction of the step the GPU is busy, and fla + HF
`generate` side by side.

    bash tests/gpu/run_on_device.sh python3 benchmarks/decode_engine.py --out $OUT/decode_engine
    python benchmarks/decode_engine.py --device cpu --quick --out /tmp/de    (CPU dry run, tiny preset)

Set-up, as in the issue: a random 1.3b-preset model (21 layers, 6 heads, dk 256, dv 512; bf16 weights,
bf16 checkpoints), 1,100-token prompts (4 cached checkpoints at segment 256), greedy, prefix caching
off, aggregation none and ssc with k = 4; the CUDA runner with CUDA graphs (one batch bucket = B).
Each row is put straight into decoding at position 1,099 (`common.start_decoding`: its 4 checkpoint
blocks and its state slot hold random values) instead of running the prefill: a decode step reads
and writes the same bytes whatever the values are, and the prefill of 512 x 1,100 tokens would not
fit the minutes of a GPU run. Per (B, aggregation): 3 warm-up steps, then `--steps` timed
`LLMEngine.step` calls (median; "runner ms" is the part spent in `runner.execute`, the rest is the
scheduler and the engine's per-token work: stop rules, detokenization, deltas), then 6 steps under
torch.profiler (GPU busy = the union of the kernels' intervals over the wall time of those steps;
the profiler slows the host a little, so this is a lower bound), then the decode graph replayed
back to back (its pure GPU time; after this the engine is discarded: the replays advanced its
positions).

Roofline per step = (all weights once + per row the fp32 state read and written + k checkpoint
blocks read) / the bandwidth of a device-to-device copy measured at the start. fla: its
`GatedDeltaNetForCausalLM` with the same shapes (random, bf16), HF `generate` greedy, ms per step =
(time of 1 + S new tokens - time of 1 new token) / S; skipped with the reason when fla or
transformers does not import. Results are written after every row (markdown + JSON), so a run cut
short keeps what it measured. Expected on an H200: ~3-5 minutes for everything.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from common import fill_pools, machine, start_decoding
from prefill import init_on_device

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.model.init_model import PRESETS, build_config
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

# ssc with the query router, as benchmarks/prefill.py (its parameters are fla's exactly)
AGGREGATIONS = {"none": dict(aggregation="none"), "ssc k=4": dict(aggregation="ssc", top_k=4, router="query")}
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written) / time."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    del a, b
    return 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def make_model(preset: str, segment: int, mc: dict, vocab: int, device: torch.device) -> MCGatedDeltaNetForCausalLM:
    """Random weights (fla's init, drawn on the device), bf16 on CUDA (fp32 on CPU)."""
    cfg = build_config(preset, vocab, dict(segment_size=segment, **mc))
    with torch.device(device):
        model = MCGatedDeltaNetForCausalLM(cfg)
    init_on_device(model, 0)
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def roofline_bytes(model: MCGatedDeltaNetForCausalLM, batch: int, k: int) -> int:
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + batch * (2 * cfg.state_bytes() + k * cfg.checkpoint_bytes(2))


def gpu_busy(engine: LLMEngine, steps: int) -> float | None:
    """Union of the CUDA kernels' intervals / wall time over `steps` engine steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - t
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    except Exception as e:  # the profiler is an extra: its failure must not lose the run
        say(f"profiler failed: {e!r}")
        return None
    busy, end = 0.0, float("-inf")
    for s, e in spans:  # microseconds
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy * 1e-6 / wall if spans else None


def replay_ms(engine: LLMEngine, batch: int, reps: int = 10) -> float | None:
    """GPU time of the decode step's graph replayed back to back (no host work in between)."""
    runner = engine.runner
    if not runner.graphs.num_graphs:
        return None
    width = runner.batch.table_width
    runner.graphs.run(batch, width)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        runner.graphs.run(batch, width)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def run_ours(model, tokenizer, batch: int, prompt_len: int, steps: int, profile_steps: int, device) -> dict:
    C = model.spec.segment_size
    n_ckpt = (prompt_len - 1) // C
    warm = 3
    max_len = prompt_len + warm + steps + profile_steps + 16
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch), max_model_len=max_len,
                       segment_size=C, num_state_slots=batch, num_checkpoint_blocks=batch * n_ckpt + 16,
                       enable_prefix_caching=False)
    t = time.perf_counter()
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.bfloat16 if device.type == "cuda" else None, seed=0,
                       runner=RunnerOptions("auto" if device.type == "cuda" else "cuda", cuda_graph_sizes=(batch,)))
    build_s = time.perf_counter() - t
    fill_pools(engine.runner)
    g = torch.Generator().manual_seed(batch)
    vocab = engine.vocab_size
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_len, ignore_eos=True)
    start_decoding(engine, prompts, params)
    for _ in range(warm):
        engine.step()
    inner, in_runner = engine.runner.execute, [0.0]

    def execute(plan, sampling):  # the runner's share of the step (its device work + its host work)
        t = time.perf_counter()
        try:
            return inner(plan, sampling)
        finally:
            in_runner[0] += time.perf_counter() - t

    engine.runner.execute = execute
    times, runner_times = [], []
    for _ in range(steps):
        in_runner[0] = 0.0
        t = time.perf_counter()
        deltas = engine.step()
        times.append(time.perf_counter() - t)
        runner_times.append(in_runner[0])
        assert len(deltas) == batch, (len(deltas), batch)
    ms = statistics.median(times) * 1e3
    busy = gpu_busy(engine, profile_steps) if device.type == "cuda" and profile_steps else None
    graph_ms = replay_ms(engine, batch) if device.type == "cuda" else None
    graphs = engine.runner.graphs
    out = {"ms_per_step": ms, "ms_min": min(times) * 1e3, "runner_ms": statistics.median(runner_times) * 1e3,
           "tok_s": batch / (ms * 1e-3), "gpu_busy": busy,
           "graph_replay_ms": graph_ms, "graphs": graphs.num_graphs, "replays": graphs.replays,
           "eager_steps": graphs.eager, "capture_s": engine.runner.capture_seconds, "engine_build_s": build_s,
           "capture_error": repr(graphs.capture_error) if getattr(graphs, "capture_error", None) else None}
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_fla(preset: str, batch: int, prompt_len: int, new_tokens: int, device) -> dict:
    """fla's GatedDeltaNetForCausalLM under HF generate: ms per decode step."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    fields = dict(PRESETS[preset])
    cfg = GatedDeltaNetConfig(fuse_cross_entropy=False, **fields)
    with torch.device(device):  # built on the device: no multi-GB fp32 copy on the host
        model = GatedDeltaNetForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(2)  # warm-up (kernel compilation)
    one, more = gen(1), gen(1 + new_tokens)
    return {"ms_per_step": (more - one) / new_tokens * 1e3, "prefill_s": one}


def write(out: Path | None, summary: dict) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_engine.json").write_text(json.dumps(summary, indent=1))
    lines = [f"{summary['machine']}; copy bandwidth {summary['copy_gb_s']:.0f} GB/s; {summary['setup']}", "",
             "| batch | aggregation | ms per step | decode tok/s | roofline ms | fraction of roofline | GPU busy "
             "| runner ms | graph replay ms | fla+HF generate ms | speed-up vs fla |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        fla = summary["fla"].get(str(r["batch"]), {}).get("ms_per_step") if r["aggregation"] == "none" else None
        cells = [str(r["batch"]), r["aggregation"], f"{r['ms_per_step']:.2f}", f"{r['tok_s']:,.0f}",
                 f"{r['roofline_ms']:.2f}", f"{r['fraction']:.1%}",
                 "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}", f"{r['runner_ms']:.2f}",
                 "-" if r["graph_replay_ms"] is None else f"{r['graph_replay_ms']:.2f}",
                 "-" if fla is None else f"{fla:.1f}", "-" if fla is None else f"{fla / r['ms_per_step']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("fla_skipped"):
        lines += ["", f"fla + HF generate: skipped ({summary['fla_skipped']})"]
    (out / "decode_engine.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="a directory: decode_engine.md and decode_engine.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", help="default 1,16,64,256,512 (--quick: 1,16,64)")
    ap.add_argument("--aggregations", default="none,ssc k=4")
    ap.add_argument("--fla-batches", help="default 1,16,64 (--quick: 1); '' to skip fla + HF generate")
    ap.add_argument("--steps", type=int, help="timed engine steps per row (default 24, --quick: 12)")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--prompt-len", type=int, default=1100)
    ap.add_argument("--quick", action="store_true", help="B=1,16,64, 12 steps, fla at B=1 only")
    args = ap.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    args.batches = args.batches or ("1,16,64" if quick else "1,16,64,256,512")
    args.steps = args.steps or (12 if quick else 24)
    args.fla_batches = args.fla_batches if args.fla_batches is not None else ("1" if quick else "1,16,64")
    if device.type == "cpu":  # a dry run of the script: the tiny preset, segment 16 (4 checkpoints at 65+)
        args.preset, args.prompt_len, args.fla_batches = "tiny", 70, ""
    segment = 256 if args.preset == "1.3b" else 16
    out = Path(args.out) if args.out else None
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = Tokenizer.from_dir(default_model_dir())
    bw = copy_bandwidth(device)
    say(f"{machine()}; device copy {bw:.0f} GB/s")
    summary = {"machine": machine(), "copy_gb_s": bw, "rows": [], "fla": {}, "fla_skipped": None,
               "setup": f"{args.preset} preset, {args.prompt_len}-token prompts, segment {segment}, greedy, "
                        f"prefix caching off, median of {args.steps} steps, rows put straight into decoding"}
    batches = [int(b) for b in args.batches.split(",")]
    vocab = 32000 if args.preset in ("1.3b", "370m") else tokenizer.vocab_size
    for agg in args.aggregations.split(","):
        mc = AGGREGATIONS[agg]
        model = make_model(args.preset, segment, mc, vocab, device)
        k = min(mc.get("top_k", 0), (args.prompt_len - 1) // segment)
        say(f"model {agg}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
        for b in batches:
            r = run_ours(model, tokenizer, b, args.prompt_len, args.steps, 6, device)
            roof = roofline_bytes(model, b, k) / (bw * 1e9) * 1e3
            r.update(batch=b, aggregation=agg, roofline_ms=roof, fraction=roof / r["ms_per_step"])
            summary["rows"].append(r)
            say(f"B={b:4d} {agg:8s} {r['ms_per_step']:8.2f} ms/step {r['tok_s']:9,.0f} tok/s roofline "
                f"{roof:.2f} ms ({r['fraction']:.1%}) busy {r['gpu_busy']} replay {r['graph_replay_ms']} "
                f"graphs {r['graphs']} eager {r['eager_steps']} capture {r['capture_s']:.1f} s")
            write(out, summary)
        del model
        gc.collect()
    fla_batches = [int(b) for b in args.fla_batches.split(",") if b]
    if fla_batches:
        try:
            import fla.models  # noqa: F401
            import transformers  # noqa: F401
        except Exception as e:
            summary["fla_skipped"] = f"import failed: {e!r}"
            fla_batches = []
    for b in fla_batches:
        try:
            r = run_fla(args.preset, b, args.prompt_len, 16, device)
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as e:  # fla's side is a comparison: a failure is reported, not fatal
            summary["fla"][str(b)] = {"error": repr(e)}
            say(f"fla B={b}: failed {e!r}")
            torch.cuda.empty_cache()
            continue
        summary["fla"][str(b)] = r
        say(f"fla+HF generate B={b:4d} {r['ms_per_step']:8.2f} ms/step (prefill {r['prefill_s']:.1f} s)")
        write(out, summary)
    summary["seconds"] = time.perf_counter() - T0
    write(out, summary)
    if out is not None:
        print((out / "decode_engine.md").read_text())
    say("done")


if __name__ == "__main__":
    main()
