"""Mixed traffic against a real `mcserve serve` for a fixed time: streaming and non-streaming chats
and completions (some multi-turn, so snapshots and cached checkpoints are reused and evicted), aborts
mid-stream, and bad input (malformed JSON, wrong types, over-long prompts, wrong key). Samples the
server's RSS and open descriptors; at the end the server must be idle with every slot and block free,
parked or cached.

    nice python benchmarks/soak.py --seconds 600

Passes (exit 0) when: no 5xx and no unexpected status, RSS after the warm-up (the first 20% of the
run) grows < 5%, idle descriptors at the end within 5 of those before the traffic, nothing held at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import time
from collections import Counter

import httpx
from live_server import LiveServer, accounted_for

BAD = [
    (b'{"messages": [', 400),
    (b'{"messages": "hi"}', 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "y " * 500_000}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "z"}], "n": 10_000}).encode(), 400),
    (b'{"messages": [{"role": "user", "content": "d"}], "n": 1, "n": 2}', 400),
]


async def worker(c: httpx.AsyncClient, srv: LiveServer, rng: random.Random, end: float, stats: Counter) -> None:
    url = srv.url
    history: list[dict] = []
    while time.monotonic() < end:
        kind = rng.choices(["stream", "plain", "completion", "abort", "bad", "badkey"], [4, 3, 2, 2, 2, 1])[0]
        if len(history) > 12:
            history = []
        history.append({"role": "user", "content": f"turn {len(history)}: {rng.random()}"})
        body = {"messages": history, "max_tokens": rng.randint(4, 32), "temperature": rng.choice((0.0, 0.8))}
        try:
            if kind == "stream" or kind == "abort":
                async with c.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    stats[f"stream {r.status_code}"] += 1
                    text, n = [], 0
                    async for line in r.aiter_lines():
                        n += 1
                        if kind == "abort" and n >= rng.randint(1, 6):
                            break
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                stats["error event"] += 1
                            for ch in chunk.get("choices", ()):
                                text.append(ch["delta"].get("content") or "")
                    if kind == "stream":
                        history.append({"role": "assistant", "content": "".join(text)})
            elif kind == "plain":
                r = await c.post(url + "/v1/chat/completions", json=body)
                stats[f"plain {r.status_code}"] += 1
                if r.status_code == 200:
                    history.append(r.json()["choices"][0]["message"])
            elif kind == "completion":
                r = await c.post(url + "/v1/completions", json={"prompt": f"Once {rng.random()}", "max_tokens": 8,
                                                               "n": rng.choice((1, 2))})
                stats[f"completion {r.status_code}"] += 1
            elif kind == "bad":
                raw, want = rng.choice(BAD)
                r = await c.post(url + "/v1/chat/completions", content=raw)
                stats[f"bad {r.status_code}{'' if r.status_code == want else ' UNEXPECTED'}"] += 1
            else:
                r = await c.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
                stats[f"badkey {r.status_code}{'' if r.status_code == 401 else ' UNEXPECTED'}"] += 1
        except httpx.HTTPError as e:
            stats[f"transport {type(e).__name__}"] += 1


async def soak(srv: LiveServer, seconds: float, concurrency: int, seed: int, samples: list) -> Counter:
    stats: Counter = Counter()
    end = time.monotonic() + seconds
    start = time.monotonic()

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic() - start, srv.rss_mb(), srv.num_fds()))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=concurrency * 2)
    # Generous: the soak checks what the server frees and keeps, not how fast a shared box answers.
    async with httpx.AsyncClient(limits=limits, timeout=600, headers=srv.headers) as c:
        rng = random.Random(seed)
        await asyncio.gather(sampler(), *(worker(c, srv, random.Random(rng.random()), end, stats)
                                          for _ in range(concurrency)))
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model")
    ap.add_argument("--server-args", default="--max-num-seqs 16 --checkpoint-memory 16MiB",
                    help="small pools by default, so that snapshots and cached blocks are evicted during the run")
    args = ap.parse_args()
    samples: list[tuple[float, float, int]] = []
    with LiveServer(args.model, tuple(shlex.split(args.server_args))) as srv:
        fds_before = srv.num_fds()  # idle, before any traffic
        stats = asyncio.run(soak(srv, args.seconds, args.concurrency, args.seed, samples))
        idle = srv.wait_idle()
        final = (args.seconds, srv.rss_mb(), srv.num_fds())
        problems = accounted_for(idle)
    warm = [s for s in samples if s[0] >= 0.2 * args.seconds] or samples
    rss_growth = (final[1] - warm[0][1]) / warm[0][1]
    fd_change = final[2] - fds_before  # both idle: the clients' connections are closed
    requests = sum(v for k, v in stats.items() if k.split()[0] in ("stream", "plain", "completion", "bad", "badkey"))
    print(f"{args.seconds:.0f} s, {args.concurrency} workers, server args '{args.server_args}': {requests} requests")
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    print(f"RSS: start {samples[0][1]:.0f} MB, after warm-up {warm[0][1]:.0f} MB, end {final[1]:.0f} MB "
          f"(+{100 * rss_growth:.1f}% after warm-up; max {max(s[1] for s in samples):.0f} MB)")
    print(f"descriptors: idle before {fds_before}, idle at the end {final[2]} (max {max(s[2] for s in samples)} "
          f"with {args.concurrency} clients connected)")
    print("at the end: " + ", ".join(f"{k} {v:g}" for k, v in idle.items() if k.startswith(("state_slots{",
                                                                                           "checkpoint_blocks{"))))
    unexpected = {k: v for k, v in stats.items() if "UNEXPECTED" in k or k.split()[-1].startswith("5")
                  or k.startswith(("transport", "error event"))}
    checks = {"no 5xx, unexpected status or transport error": not unexpected,
              "RSS after warm-up grows < 5%": rss_growth < 0.05,
              "descriptors stable (idle at the end within 5 of idle before)": fd_change <= 5,
              "every slot and block accounted for": not problems}
    for p in problems:
        print(f"  {p}")
    for k, v in unexpected.items():
        print(f"  unexpected: {v} x {k}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
