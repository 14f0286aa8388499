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
from chat_ttft import chat as ttft_chat
from common import machine
from prefill import SIZES, build_model, chat_engine, chat_shape

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.engine.llm_engine import LLMEngine


class FirstSteps:
    """Hooks on an engine for chat_ttft.chat: each turn's first step (the one that returns its first
    token) is timed, with the runner's `execute` inside it, and run under `tool` for the turns in
    `labels` (turn number -> output file label)."""

    def __init__(self, engine: LLMEngine, labels: dict[int, str], out_dir: Path | None, tool: str) -> None:
        self.rows: list[dict] = []
        self.turn, self.first = 0, False
        add, step, execute = engine.add_request, engine.step, engine.runner.execute
        exec_s: list[float] = []

        def add_request(request):
            self.turn, self.first = self.turn + 1, True
            return add(request)

        def timed_execute(*a, **k):
            t = time.perf_counter()
            try:
                return execute(*a, **k)
            finally:
                exec_s.append(time.perf_counter() - t)

        def first_step():
            if not self.first:
                return step()
            self.first = False
            label = labels.get(self.turn)
            exec_s.clear()
            engine.runner.execute = timed_execute
            t0 = time.perf_counter()
            try:
                if label is not None and tool == "cprofile":
                    prof = cProfile.Profile()
                    deltas = prof.runcall(step)
                    if out_dir is not None:
                        s = io.StringIO()
                        st = pstats.Stats(prof, stream=s)
                        st.sort_stats("cumulative").print_stats(60)
                        st.sort_stats("tottime").print_stats(40)
                        (out_dir / f"cprofile_{label}.txt").write_text(s.getvalue())
                elif label is not None and tool == "torch":
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    with torch.profiler.profile(activities=acts) as tprof:
                        deltas = step()
                    if out_dir is not None:
                        text = tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60,
                                                          max_name_column_width=70)
                        (out_dir / f"torch_ops_{label}.txt").write_text(text + "\n")
                else:
                    deltas = step()
            finally:
                engine.runner.execute = execute
            self.rows.append({"turn": self.turn, "first_step_ms": (time.perf_counter() - t0) * 1000,
                              "execute_ms": exec_s[0] * 1000 if exec_s else None,
                              "tool": tool if label is not None else None})
            return deltas

        engine.add_request, engine.step = add_request, first_step


def chat(engine: LLMEngine, shape: tuple[int, int, int, int], seed: int, labels: dict[int, str],
         out_dir: Path | None, tool: str) -> list[dict]:
    """chat_ttft.chat with FirstSteps' hooks; per turn its first step's row plus ttft_ms, prompt_tokens and
    computed (tokens prefilled before the first token)."""
    hooks = FirstSteps(engine, labels, out_dir, tool)
    try:
        turns = ttft_chat(engine, *shape, seed=seed)
    finally:
        del engine.add_request, engine.step  # back to the class's methods
    for row, (ttft, prompt_len, computed) in zip(hooks.rows, turns, strict=True):
        row.update(ttft_ms=ttft * 1000, prompt_tokens=prompt_len, computed=computed)
    return hooks.rows


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
    shape = chat_shape(turns)
    result = {"machine": machine(), "preset": preset, "segment": C, "turns": turns}
    for mode in ("reuse", "no-reuse") if args.no_reuse else ("reuse",):
        engine = chat_engine(model, ck, turns, mode == "reuse")
        ttft_chat(engine, *shape, seed=99)  # warm-up
        plain = chat(engine, shape, seed=1, labels={}, out_dir=None, tool="")
        prof = {2: f"{mode}_turn2", turns: f"{mode}_turn{turns}"}
        cp = chat(engine, shape, seed=2, labels=prof, out_dir=out, tool="cprofile")
        tp = chat(engine, shape, seed=3, labels=prof, out_dir=out, tool="torch")
        timed = chat(engine, shape, seed=4, labels={}, out_dir=None, tool="")
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
