"""Time to first token of each turn of a 20-turn chat, with and without prefix reuse.

    python benchmarks/chat_ttft.py [--model DIR] [--preset tiny] [--device cpu] [--repeats 5]

Turn N's prompt is turn N-1's prompt + its answer (the exact token ids) + a new user message, as a
chat client resends the whole conversation. Three engines:
  reuse:       prefix caching + end-of-turn snapshots (resume exactly where the last answer ended);
  ckpt-only:   prefix caching without snapshots (resume at the last cached segment boundary);
  no-reuse:    prefix caching off (every turn prefills the whole conversation).
TTFT = from add_request to the step that returns the turn's first token (engine time, no HTTP).
Each number is the median over --repeats runs of the whole chat (after one warm-up chat).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, model_dir

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.sampling_params import SamplingParams

MODES = {"reuse": dict(enable_prefix_caching=True, enable_snapshots=True),
         "ckpt-only": dict(enable_prefix_caching=True, enable_snapshots=False),
         "no-reuse": dict(enable_prefix_caching=False)}


def chat(engine: LLMEngine, turns: int, system: int, user: int, answer: int, seed: int) -> list[tuple[float, int, int]]:
    """Per turn: (TTFT seconds, prompt tokens, prompt tokens computed)."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(3, engine.vocab_size, (n,), generator=g).tolist()

    params = SamplingParams(temperature=0.0, max_tokens=answer, ignore_eos=True)
    history, out = words(system), []
    for turn in range(turns):
        prompt = history + words(user)
        before = engine.counters["prefill_tokens"]
        start = time.perf_counter()
        engine.add_request(GenerateRequest(f"turn-{turn}", tuple(prompt), params))
        ttft, reply = None, []
        while engine.has_unfinished():
            for d in engine.step():
                if d.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                    computed = engine.counters["prefill_tokens"] - before
                reply.extend(d.token_ids)
        out.append((ttft, len(prompt), computed))
        history = prompt + reply
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--system-len", type=int, default=32)
    ap.add_argument("--user-len", type=int, default=48)
    ap.add_argument("--answer-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    path = model_dir(args.model, args.preset)
    total = args.system_len + args.turns * (args.user_len + args.answer_len)
    shape = (args.turns, args.system_len, args.user_len, args.answer_len)
    results: dict[str, list[list[tuple[float, int, int]]]] = {}
    for mode, flags in MODES.items():
        engine = LLMEngine.from_model_dir(path, device=args.device, max_num_seqs=4, max_model_len=total + 64,
                                          **flags)
        chat(engine, *shape, seed=99)  # warm-up (its cache entries cannot match: other tokens)
        results[mode] = [chat(engine, *shape, seed=r) for r in range(args.repeats)]

    print(f"model: {path} ({args.preset} preset unless --model), device {args.device}, "
          f"segment size {engine.config.segment_size}, aggregation {engine.model.spec.aggregation}")
    print(f"machine: {machine()}")
    print(f"chat: system {args.system_len} tokens, user {args.user_len} per turn, answer {args.answer_len} "
          f"(greedy); median of {args.repeats} runs\n")
    print("| turn | prompt tokens | " + " | ".join(f"{m} TTFT ms | {m} computed" for m in MODES) + " |")
    print("|---:|---:|" + "---:|---:|" * len(MODES))
    med: dict[str, list[float]] = {}
    for mode, runs in results.items():
        med[mode] = [statistics.median(run[t][0] for run in runs) * 1000 for t in range(args.turns)]
    for t in range(args.turns):
        first = results["reuse"][0][t]
        cells = " | ".join(f"{med[m][t]:.1f} | {results[m][0][t][2]}" for m in MODES)
        print(f"| {t + 1} | {first[1]} | {cells} |")
    last = args.turns - 1
    print()
    for mode in MODES:
        print(f"{mode}: turn {args.turns} / turn 2 TTFT = {med[mode][last] / med[mode][1]:.2f}x")


if __name__ == "__main__":
    main()
