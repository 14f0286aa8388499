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
back to back (its pure GPU time) and 10 replays under the profiler; after this the engine is
closed and freed (the replays advanced its positions), and the GPU memory it held must be back
before the next row (`left_gib`; a runner that outlives its engine is reported with what holds it).
Both profiles' top-kernel tables (key_averages by self CUDA time, 25 rows) go to
decode_engine_kernels.txt, one section per row.
--decode-matmul both runs each row with the engine's default matmuls (auto: per matmul the faster of
cuBLAS and kernels/triton_mm.py as measured on the card, kernels/configs/matmul_<card>.json) and
again with cuBLAS only (rows "... (cublas)"); the JSON records each row's plan.
--async-scheduling on | both runs the rows with the engine's async scheduling (rows "none (async)":
step n+1 launched before step n's outputs are processed, server/engine/pipeline.py; the engine's
default on a GPU), "both" each batch serially and then async, side by side; "runner ms" is then the
runner's launch + collect (collect includes the wait for the device). The default, off, runs the
serial engine (`async_scheduling=False`, whatever the engine's default).

Roofline per step = (all weights once + per row the fp32 state read and written + k checkpoint
blocks read) / the bandwidth of a device-to-device copy measured at the start. fla: its
`GatedDeltaNetForCausalLM` with the same shapes (random, bf16), HF `generate` greedy
(benchmarks/fla_generate.py, in a child process cut after --fla-seconds: fla compiles and autotunes
its kernels on first use), ms per step = (time of 1 + S new tokens - time of 1 new token) / S with
S = --fla-tokens; skipped with the reason when fla or transformers is missing. Results are written
after every row (markdown + JSON + kernel tables), so a run cut short keeps what it measured; a row
that fails (out of memory) is recorded and the others still run. Expected on an H200: ~2-3 minutes
for our 10 rows, plus at most --fla-seconds (120) for fla's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from common import copy_bandwidth, fill_pools, machine, start_decoding
from gpu_profile import profile_calls
from prefill import init_on_device

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.factory import RunnerOptions
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.model.init_model import build_config
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

# ssc with the query router, as benchmarks/prefill.py (its parameters are fla's exactly)
AGGREGATIONS = {"none": dict(aggregation="none"), "ssc k=4": dict(aggregation="ssc", top_k=4, router="query")}
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


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


def replay_ms(runner, batch: int, reps: int = 10) -> float:
    """GPU time of the decode step's graph replayed back to back (no host work in between)."""
    width = runner.batch.table_width
    runner.graphs.run(batch, width)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        runner.graphs.run(batch, width)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def measure(engine: LLMEngine, batch: int, steps: int, profile_steps: int, label: str, tables: list[str]) -> dict:
    """The timed steps, the profiled steps and the replays of one engine (which nothing outside keeps)."""
    runner = engine.runner
    in_runner = [0.0]

    def in_the_runner(inner):  # the runner's share of the step (its device work + its host work)
        def call(*a):
            t = time.perf_counter()
            try:
                return inner(*a)
            finally:
                in_runner[0] += time.perf_counter() - t
        return call

    # async scheduling calls launch and collect (execute calls both: wrapping all would count twice)
    entries = ("launch", "collect") if engine.pipeline is not None else ("execute",)
    for name in entries:
        setattr(runner, name, in_the_runner(getattr(runner, name)))
    # the host phases outside the runner (where the step's host time goes on the card)
    phases = {"schedule": (engine.scheduler, "schedule"), "update": (engine.scheduler, "update"),
              "outputs": (engine, "_stop_checks")}
    in_phase = {name: [] for name in phases}
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return call

    for name, (obj, attr) in phases.items():
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    times, runner_times = [], []
    try:
        for _ in range(steps):
            in_runner[0] = 0.0
            spent.clear()
            t = time.perf_counter()
            n = len(engine.step())
            times.append(time.perf_counter() - t)
            runner_times.append(in_runner[0])
            for name in phases:
                in_phase[name].append(spent.get(name, 0.0))
            assert n == batch, (n, batch)
    finally:
        for name in entries:  # the instance attributes: the closures held the runner and engine (cycles)
            delattr(runner, name)
        for obj, attr in phases.values():
            delattr(obj, attr)
    ms = statistics.median(times) * 1e3
    host_ms = {name: statistics.median(v) * 1e3 for name, v in in_phase.items()}
    say(f"{label}: host outside the runner, ms per step (median): "
        + ", ".join(f"{name} {v:.2f}" for name, v in host_ms.items()))
    out = {"ms_per_step": ms, "ms_min": min(times) * 1e3, "runner_ms": statistics.median(runner_times) * 1e3,
           "host_phases_ms": host_ms,
           "tok_s": batch / (ms * 1e-3), "gpu_busy": None, "gpu_ops_per_step": None, "graph_replay_ms": None,
           "gpu_ops_per_replay": None}
    if profile_steps:
        try:  # the profiler is an extra: its failure must not lose the row
            p = profile_calls(engine.step, profile_steps, f"{label}: engine steps")
            out.update(gpu_busy=p.busy, gpu_ops_per_step=p.gpu_ops_per_call)
            tables.append(p.table)
        except Exception as e:
            say(f"profiler failed: {e!r}")
    graphs = runner.graphs
    if graphs.num_graphs:  # the replays advance the positions: after this the engine only gets freed
        out["graph_replay_ms"] = replay_ms(runner, batch)
        width = runner.batch.table_width
        p = profile_calls(lambda: graphs.run(batch, width), 10, f"{label}: decode graph replays")
        out["gpu_ops_per_replay"] = p.gpu_ops_per_call
        tables.append(p.table)
    out.update(graphs=graphs.num_graphs, replays=graphs.replays, eager_steps=graphs.eager,
               capture_s=runner.capture_seconds, capture_error=graphs.capture_error)
    return out


def gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def run_ours(model, tokenizer, batch: int, prompt_len: int, steps: int, profile_steps: int, device,
             label: str, tables: list[str], overlap: bool = False, decode_matmul: str = "auto") -> dict:
    C = model.spec.segment_size
    n_ckpt = (prompt_len - 1) // C
    warm = 3
    max_len = prompt_len + warm + steps + 2 * profile_steps + 16
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch), max_model_len=max_len,
                       segment_size=C, num_state_slots=batch, num_checkpoint_blocks=batch * n_ckpt + 16,
                       enable_prefix_caching=False)
    before = gib(device)
    t = time.perf_counter()
    engine = LLMEngine(model, tokenizer, cfg, ckpt_dtype=torch.bfloat16 if device.type == "cuda" else None, seed=0,
                       runner=RunnerOptions("auto" if device.type == "cuda" else "cuda", cuda_graph_sizes=(batch,),
                                            async_scheduling=overlap, decode_matmul=decode_matmul))
    build_s = time.perf_counter() - t
    assert (engine.pipeline is not None) == overlap, (overlap, engine.pipeline)  # the mode the row is named for
    runner_ref = weakref.ref(engine.runner)
    matmul_table = getattr(engine.runner, "matmul_table", None)
    step_fn = getattr(engine.runner, "step_fn", None)
    matmul_plan = ([c.name() if c else "cublas" for c in step_fn.plan(batch, model.model.embeddings.weight.dtype)]
                   if step_fn is not None else None)
    try:
        fill_pools(engine.runner)
        g = torch.Generator().manual_seed(batch)
        vocab = engine.vocab_size
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        start_decoding(engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_len, ignore_eos=True))
        for _ in range(warm):
            engine.step()
        held = gib(device)
        out = measure(engine, batch, steps, profile_steps, label, tables)
    finally:
        engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.update(engine_build_s=build_s, engine_gib=held - before, left_gib=gib(device) - before,
               matmul_table=matmul_table, matmul_plan=matmul_plan)
    if runner_ref() is not None:  # what keeps the next row from getting the memory back
        holders = [type(r).__name__ for r in gc.get_referrers(runner_ref())]
        say(f"B={batch}: the runner outlived its engine, held by {holders}")
        out["runner_held_by"] = holders
    return out


def run_fla(preset: str, prompt_len: int, batches: list[int], new_tokens: int, seconds: float) -> dict:
    """fla_generate.py in a child process, killed after `seconds`: {batch: row} of what finished."""
    script = Path(__file__).with_name("fla_generate.py")
    cmd = [sys.executable, str(script), "--preset", preset, "--prompt-len", str(prompt_len), "--batches",
           ",".join(map(str, batches)), "--new-tokens", str(new_tokens)]
    try:
        text, cut = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=seconds).stdout, False
    except subprocess.TimeoutExpired as e:
        text, cut = e.stdout or "", True
        text = text.decode() if isinstance(text, bytes) else text
    rows = {}
    for line in text.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[str(r["batch"])] = r
    for b in batches:
        if str(b) not in rows:
            rows[str(b)] = {"error": f"not reached in the {seconds:.0f} s limit" if cut else "no result"}
    return rows


def write(out: Path | None, summary: dict, tables: list[str]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_engine.json").write_text(json.dumps(summary, indent=1))
    (out / "decode_engine_kernels.txt").write_text("\n\n".join(tables) + "\n")
    lines = [f"{summary['machine']}; copy bandwidth {summary['copy_gb_s']:.0f} GB/s; {summary['setup']}", "",
             "| batch | aggregation | ms per step | decode tok/s | roofline ms | fraction of roofline | GPU busy "
             "| runner ms | graph replay ms | GPU ops per replay | fla+HF generate ms | speed-up vs fla |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['aggregation']} | failed: {r['error']} |")
            continue
        plain = r["aggregation"].split(" (")[0] == "none"  # "none (async)" etc. too: fla's rows are online-only
        fla = summary["fla"].get(str(r["batch"]), {}).get("ms_per_step") if plain else None
        cells = [str(r["batch"]), r["aggregation"], f"{r['ms_per_step']:.2f}", f"{r['tok_s']:,.0f}",
                 f"{r['roofline_ms']:.2f}", f"{r['fraction']:.1%}",
                 "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}", f"{r['runner_ms']:.2f}",
                 "-" if r["graph_replay_ms"] is None else f"{r['graph_replay_ms']:.2f}",
                 "-" if r["gpu_ops_per_replay"] is None else f"{r['gpu_ops_per_replay']:.0f}",
                 "-" if fla is None else f"{fla:.1f}", "-" if fla is None else f"{fla / r['ms_per_step']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    fla_notes = [f"fla B={b}: {r['error']}" for b, r in summary["fla"].items() if "error" in r]
    if summary.get("fla_skipped"):
        fla_notes.append(f"fla + HF generate: skipped ({summary['fla_skipped']})")
    lines += [""] + fla_notes if fla_notes else []
    (out / "decode_engine.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="a directory: decode_engine.md, decode_engine.json, decode_engine_kernels.txt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", help="default 1,16,64,256,512 (--quick: 1,16,64)")
    ap.add_argument("--aggregations", default="none,ssc k=4")
    ap.add_argument("--fla-batches", help="default 1,16,64 (--quick: 1); '' to skip fla + HF generate")
    ap.add_argument("--fla-seconds", type=float, default=120.0, help="time limit of all fla rows together")
    ap.add_argument("--fla-tokens", type=int, default=8, help="timed new tokens per fla row")
    ap.add_argument("--async-scheduling", choices=("off", "on", "both"), default="off",
                    help="rows with the engine's async scheduling (the engine's default on a GPU): off (the serial "
                         "engine), on (instead), both (side by side)")
    ap.add_argument("--decode-matmul", choices=("auto", "cublas", "both"), default="auto",
                    help="the decode matmuls (RunnerOptions.decode_matmul): auto (the engine's default: the card's "
                         "measured cuBLAS / Triton choice), cublas, or both side by side (rows '... (cublas)')")
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
    tokenizer = Tokenizer.from_dir(default_model_dir())
    bw = copy_bandwidth(device)
    say(f"{machine()}; device copy {bw:.0f} GB/s")
    summary = {"machine": machine(), "copy_gb_s": bw, "rows": [], "fla": {}, "fla_skipped": None,
               "setup": f"{args.preset} preset, {args.prompt_len}-token prompts, segment {segment}, greedy, "
                        f"prefix caching off, median of {args.steps} steps, rows put straight into decoding"}
    tables: list[str] = []
    batches = [int(b) for b in args.batches.split(",")]
    vocab = 32000 if args.preset in ("1.3b", "370m") else tokenizer.vocab_size
    for agg in args.aggregations.split(","):
        mc = AGGREGATIONS[agg]
        model = make_model(args.preset, segment, mc, vocab, device)
        k = min(mc.get("top_k", 0), (args.prompt_len - 1) // segment)
        say(f"model {agg}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
            f"{gib(device):.1f} GiB allocated")
        modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.async_scheduling]
        mms = {"auto": ("auto",), "cublas": ("cublas",), "both": ("auto", "cublas")}[args.decode_matmul]
        cells = [(b, a, mm) for b in batches for a in modes for mm in mms]
        for b, overlap, mm in cells:
            name = (agg + (" (async)" if overlap else "")
                    + (" (cublas)" if mm == "cublas" and args.decode_matmul == "both" else ""))
            try:
                r = run_ours(model, tokenizer, b, args.prompt_len, args.steps, 6, device, f"B={b} {name}", tables,
                             overlap, mm)
            except Exception as e:  # one row failing (memory) must not lose the others
                say(f"B={b} {name}: failed {e!r}")
                summary["rows"].append({"batch": b, "aggregation": name, "error": repr(e)})
                write(out, summary, tables)
                continue
            roof = roofline_bytes(model, b, k) / (bw * 1e9) * 1e3
            r.update(batch=b, aggregation=name, roofline_ms=roof, fraction=roof / r["ms_per_step"])
            summary["rows"].append(r)
            say(f"B={b:4d} {name:15s} {r['ms_per_step']:8.2f} ms/step {r['tok_s']:9,.0f} tok/s roofline "
                f"{roof:.2f} ms ({r['fraction']:.1%}) busy {r['gpu_busy']} replay {r['graph_replay_ms']} "
                f"({r['gpu_ops_per_replay']} GPU ops) graphs {r['graphs']} eager {r['eager_steps']} capture "
                f"{r['capture_s']:.1f} s; engine {r['engine_gib']:.1f} GiB, {r['left_gib']:.2f} GiB left after it")
            write(out, summary, tables)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fla_batches = [int(b) for b in args.fla_batches.split(",") if b]
    missing = [m for m in ("fla", "transformers") if importlib.util.find_spec(m) is None]
    if fla_batches and missing:
        summary["fla_skipped"] = f"{' and '.join(missing)} not installed"
    elif fla_batches:
        say(f"fla + HF generate B={fla_batches} in a child process, at most {args.fla_seconds:.0f} s")
        summary["fla"] = run_fla(args.preset, args.prompt_len, fla_batches, args.fla_tokens, args.fla_seconds)
        for b, r in summary["fla"].items():
            say(f"fla+HF generate B={b:>4s} {r}")
    summary["seconds"] = time.perf_counter() - T0
    write(out, summary, tables)
    if out is not None:
        print((out / "decode_engine.md").read_text())
    say("done")


if __name__ == "__main__":
    main()
