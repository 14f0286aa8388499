"""Where the host time of a chat turn's prefill step goes: Python functions (cProfile) and torch ops.

    bash tests/gpu/run_on_device.sh python3 benchmarks/host_profile.py --out $OUT/hp   (carry .whl; ~1-2 min)
    python benchmarks/host_profile.py --tiny --out /tmp/hp                           (CPU smoke run)

benchmarks/prefill.py's chat TTFT (random 1.3b preset, ssc k=4, bf16, the engine with prefix reuse
and snapshots, eager decode, 20 turns of 48 user + 8 answer tokens) measured every turn at ~70-110 ms
on the H200 whether 56 or 1,600 tokens were computed, i.e. a fixed cost per prefill step. This script
runs the same chat once as a warm-up, then again with the first step of turns 2 and 20 (the step that
returns the turn's first token) under cProfile and, separately, torch.profiler, and writes:
- ttft.json: per turn the step's wall ms, and for the profiled turns the wall ms of the same step
  split into the runner's `execute` and the rest;
- cprofile_turn{2,20}.txt: the step's Python functions by cumulative and by own time;
- torch_ops_turn{2,20}.txt: torch ops by self CPU time with call counts (and CUDA kernel time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from common import machine
from prefill import SIZES, build_model

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.engine.args import EngineArgs, engine_config, size_pools
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.default import default_model_dir
from mcserve.server.text.tokenizer import Tokenizer


def make_engine(model, ckpt_dtype: torch.dtype, total: int, reuse: bool) -> LLMEngine:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    flags = dict(enable_prefix_caching=True, enable_snapshots=True) if reuse else dict(enable_prefix_caching=False)
    args = EngineArgs(device=str(model.device), max_num_seqs=4, max_model_len=total + 64, enforce_eager=True,
                      checkpoint_memory=4 * 2**30 if model.device.type == "cuda" else 2**28, **flags)
    pools = size_pools(args, model.cfg, model.device, model.dtype, ckpt_dtype, model.state_dtype)
    return LLMEngine(model, tokenizer, engine_config(args, model.cfg, pools), ckpt_dtype=ckpt_dtype,
                     runner=args.runner_options())


def chat(engine: LLMEngine, turns: int, system: int, user: int, answer: int, seed: int,
         profile_turns: dict[int, str], out_dir: Path | None, tool: str) -> list[dict]:
    """chat_ttft.chat with the first step of each turn in `profile_turns` run under `tool`."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(3, engine.vocab_size, (n,), generator=g).tolist()

    params = SamplingParams(temperature=0.0, max_tokens=answer, ignore_eos=True)
    history, rows = words(system), []
    runner = engine.runner
    for turn in range(turns):
        prompt = history + words(user)
        before = engine.counters["prefill_tokens"]
        start = time.perf_counter()
        engine.add_request(GenerateRequest(f"turn-{turn}", tuple(prompt), params))
        first, reply, ttft = True, [], None
        while engine.has_unfinished():
            label = profile_turns.get(turn + 1) if first else None
            exec_s: list[float] = []
            if label is not None:
                inner = runner.execute

                def timed_execute(*a, inner=inner, exec_s=exec_s, **k):
                    t = time.perf_counter()
                    try:
                        return inner(*a, **k)
                    finally:
                        exec_s.append(time.perf_counter() - t)
                runner.execute = timed_execute
            t0 = time.perf_counter()
            if label is not None and tool == "cprofile":
                prof = cProfile.Profile()
                prof.enable()
                deltas = engine.step()
                prof.disable()
            elif label is not None and tool == "torch":
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=acts) as tprof:
                    deltas = engine.step()
            else:
                deltas = engine.step()
            step_s = time.perf_counter() - t0
            if label is not None:
                runner.execute = inner
                if out_dir is not None and tool == "cprofile":
                    s = io.StringIO()
                    st = pstats.Stats(prof, stream=s)
                    st.sort_stats("cumulative").print_stats(60)
                    st.sort_stats("tottime").print_stats(40)
                    (out_dir / f"cprofile_{label}.txt").write_text(s.getvalue())
                if out_dir is not None and tool == "torch":
                    text = tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60,
                                                      max_name_column_width=70)
                    (out_dir / f"torch_ops_{label}.txt").write_text(text + "\n")
            if first:
                rows.append({"turn": turn + 1, "prompt_tokens": len(prompt), "first_step_ms": step_s * 1000,
                             "execute_ms": exec_s[0] * 1000 if exec_s else None, "tool": tool if label else None})
            first = False
            for d in deltas:
                if d.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                    rows[-1]["ttft_ms"] = ttft * 1000
                    rows[-1]["computed"] = engine.counters["prefill_tokens"] - before
                reply.extend(d.token_ids)
        history = prompt + reply
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-reuse", action="store_true", help="also profile the engine without prefix reuse")
    args = ap.parse_args()
    preset, C, _, _, _, turns = SIZES["tiny" if args.tiny else "full"]
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, C, dev, dtype)
    model.spec = MCSpec("ssc", C, top_k=4)
    ck = torch.bfloat16 if dev.type == "cuda" else model.state_dtype
    shape = (turns, 32, 48, 8)
    total = 32 + turns * 56
    result = {"machine": machine(), "preset": preset, "segment": C, "turns": turns}
    for mode in ("reuse", "no-reuse") if args.no_reuse else ("reuse",):
        engine = make_engine(model, ck, total, mode == "reuse")
        chat(engine, *shape, seed=99, profile_turns={}, out_dir=None, tool="")  # warm-up
        plain = chat(engine, *shape, seed=1, profile_turns={}, out_dir=None, tool="")
        prof = {2: f"{mode}_turn2", turns: f"{mode}_turn{turns}"}
        cp = chat(engine, *shape, seed=2, profile_turns=prof, out_dir=out, tool="cprofile")
        tp = chat(engine, *shape, seed=3, profile_turns=prof, out_dir=out, tool="torch")
        timed = chat(engine, *shape, seed=4, profile_turns={t: f"x{t}" for t in range(1, turns + 1)},
                     out_dir=None, tool="")
        result[mode] = {"plain": plain, "cprofile": [r for r in cp if r["tool"]], "torch": [r for r in tp if r["tool"]],
                        "split": timed,
                        "median_execute_share": statistics.median(r["execute_ms"] / r["first_step_ms"] for r in timed)}
        print(mode, json.dumps({"plain ttft": [round(r.get("ttft_ms", 0), 1) for r in plain],
                                "split": [(round(r["first_step_ms"], 1), round(r["execute_ms"], 1)) for r in timed]}),
              flush=True)
        del engine
    if out:
        (out / "ttft.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
