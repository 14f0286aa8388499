"""Client cuts against a real `mcserve serve`: requests whose connection is dropped at a random moment
(before the response, after the first chunks, during a non-streaming wait). Afterwards the server
must be idle with nothing allocated: no running or waiting request, no slot or block held.

    nice python benchmarks/client_cuts.py --cuts 10000

Exit status 0 when everything was freed and /health still answers 200; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import time

import httpx
from live_server import LiveServer, accounted_for


async def cut_one(client: httpx.AsyncClient, url: str, headers: dict, rng: random.Random) -> str:
    """One request, dropped at a random point; returns how it was cut."""
    stream = rng.random() < 0.75
    body = {"messages": [{"role": "user", "content": f"cut {rng.random()} " * rng.randint(1, 12)}],
            "max_tokens": rng.randint(4, 48), "stream": stream, "n": rng.choice((1, 1, 1, 2))}
    # A client-side timeout closes the connection: the cut of a client that gave up waiting.
    timeout = rng.uniform(0.005, 0.5) if not stream else rng.uniform(0.05, 5.0)
    if not stream:
        try:
            await client.post(url, json=body, headers=headers, timeout=timeout)
            return "finished first"
        except httpx.TimeoutException:
            return "cut while waiting"
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            chunks = rng.choice((0, 0, 1, 2, 5))
            if chunks == 0:
                return "cut before reading"
            n = 0
            async for _ in r.aiter_raw():
                n += 1
                if n >= chunks:
                    return "cut mid-stream"
            return "finished first"
    except httpx.TimeoutException:
        return "cut while waiting"
    except httpx.HTTPError as e:
        return f"error {type(e).__name__}"


async def run(url: str, headers: dict, cuts: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    # No keep-alive: a cut must close its own connection, as a client that goes away does.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:

        async def task(i: int) -> None:
            async with sem:
                o = await cut_one(client, url + "/v1/chat/completions", headers, random.Random(rng.random()))
                outcomes[o] = outcomes.get(o, 0) + 1

        await asyncio.gather(*(task(i) for i in range(cuts)))
    return outcomes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuts", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model")
    ap.add_argument("--server-args", default="")
    args = ap.parse_args()
    with LiveServer(args.model, tuple(shlex.split(args.server_args))) as srv:
        start = time.monotonic()
        outcomes = asyncio.run(run(srv.url, srv.headers, args.cuts, args.concurrency, args.seed))
        wall = time.monotonic() - start
        idle = srv.wait_idle()
        problems = accounted_for(idle)
        healthy = httpx.get(srv.url + "/health", timeout=10).status_code == 200
        freed = {k: idle[k] for k in ("state_slots{running}", "state_slots{parked}", "checkpoint_blocks{running}",
                                      "checkpoint_blocks{cached}")}
    errors = {k: v for k, v in outcomes.items() if k.startswith("error")}
    print(f"{args.cuts} requests ({args.concurrency} at a time) in {wall:.1f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    print(f"after: {freed}; /health {'200' if healthy else 'NOT 200'}")
    for p in problems:
        print(f"  {p}")
    return 0 if not problems and healthy and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
