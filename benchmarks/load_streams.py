"""Many concurrent streaming chat clients against a real `mcserve serve` (default settings unless
`--server-args`): every request must either complete (a finish_reason, then `data: [DONE]`) or be
refused with 503 + Retry-After and an OpenAI error body; any other outcome fails the run. Prints
TTFT and end-to-end percentiles of the completed ones and the time to a 503.

    nice python benchmarks/load_streams.py --clients 1000
    nice python benchmarks/load_streams.py --clients 1000 --server-args "--max-num-seqs 8 --max-waiting 16"

`--client raw` sends the same requests over bare sockets instead of httpx, whose connection pool costs
the client seconds with a thousand connections on a small machine (so its times are partly the
client's own); `--client both` runs the httpx wave, then the raw one, against one server.
Exit status 0 when every request is accounted for (and, after the run, the server is idle with
nothing held); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import time
from collections import Counter

import httpx
from live_server import LiveServer, accounted_for, percentile


def request_body(i: int, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Client {i} says hello. Tell me a story."}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0.0}


class StreamCheck:
    """One response from its start: the 503's shape, or what the stream's `data:` lines say (time to the
    first content, a finish_reason, `[DONE]`, an error event). Its outcomes are `one`'s."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.ttft = float("nan")
        self.finished = self.done = False
        self.error: str | None = None

    def result(self, outcome: str) -> tuple[str, float, float]:
        return outcome, self.ttft, time.monotonic() - self.start

    def refused(self, has_retry_after: bool, body: bytes) -> tuple[str, float, float]:
        err = json.loads(body)["error"]
        ok = has_retry_after and err["type"] and err["message"]
        return self.result("503" if ok else f"503 without Retry-After/body: {err}")

    def line(self, line: str) -> bool:
        """Takes one line of the stream; False once it is over ([DONE] or an error event)."""
        if line == "data: [DONE]":
            self.done = True
            return False
        if not line.startswith("data: "):
            return True
        chunk = json.loads(line[6:])
        if "error" in chunk:
            self.error = f"error event: {chunk['error']}"
            return False
        for c in chunk["choices"]:
            if c["delta"].get("content") and self.ttft != self.ttft:
                self.ttft = time.monotonic() - self.start
            self.finished = self.finished or c.get("finish_reason") is not None
        return True

    def streamed(self) -> tuple[str, float, float]:
        if self.error is not None:
            return self.result(self.error)
        if not (self.finished and self.done):
            return self.result(f"stream ended early (finish={self.finished}, [DONE]={self.done})")
        return self.result("ok")


async def one(client: httpx.AsyncClient, url: str, headers: dict, i: int, max_tokens: int) -> tuple[str, float, float]:
    """(outcome, ttft_s, total_s); outcome "ok", "503", or a description of what went wrong."""
    check = StreamCheck()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=request_body(i, max_tokens),
                                 headers=headers) as r:
            if r.status_code == 503:
                return check.refused("retry-after" in r.headers, await r.aread())
            if r.status_code != 200:
                return check.result(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not check.line(line):
                    break
            return check.streamed()
    except httpx.HTTPError as e:
        return check.result(f"transport error {type(e).__name__}: {e}")


async def one_raw(port: int, headers: dict, i: int, max_tokens: int) -> tuple[str, float, float]:
    """`one` over a bare asyncio socket (HTTP/1.1 by hand, chunked SSE decoded here): next to no client
    work per request, so with a thousand at once the times are the server's, not httpx's pool's."""
    body = json.dumps(request_body(i, max_tokens)).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    check = StreamCheck()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return check.result(f"transport error {type(e).__name__}: {e}")
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        fields = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        if status == 503:
            return check.refused("retry-after" in fields, await reader.readexactly(int(fields["content-length"])))
        if status != 200:
            return check.result(f"status {status}")
        pending, going = b"", True
        while going:
            size = int((await reader.readline()).strip() or b"0", 16)  # chunked transfer encoding
            if size == 0:
                break
            pending += (await reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for line in (x for event in events for x in event.decode().splitlines()):
                going = going and check.line(line)
        return check.streamed()
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        return check.result(f"transport error {type(e).__name__}: {e}")
    finally:
        writer.close()


async def run(srv: LiveServer, client: str, clients: int, max_tokens: int) -> list[tuple[str, float, float]]:
    if client == "raw":
        return await asyncio.gather(*(one_raw(srv.port, srv.headers, i, max_tokens) for i in range(clients)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=60)) as c:
        return await asyncio.gather(*(one(c, srv.url, srv.headers, i, max_tokens) for i in range(clients)))


def report(label: str, results: list[tuple[str, float, float]], wall: float, problems: list[str]) -> bool:
    """Prints the wave's figures; True when every request completed or got 503 and nothing is held."""
    outcomes = Counter(o for o, _, _ in results)
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == "503"]
    bad = {o: n for o, n in outcomes.items() if o not in ("ok", "503")}
    ttft = [t for _, t, _ in ok]
    print(f"{label}: {len(ok)} completed, {len(refused)} got 503 + Retry-After, {sum(bad.values())} other; "
          f"{wall:.1f} s")
    if ok:
        e2e = [e for *_, e in ok]
        print(f"TTFT p50 {percentile(ttft, 50):.2f} s, p90 {percentile(ttft, 90):.2f} s, "
              f"p99 {percentile(ttft, 99):.2f} s; e2e p50 {percentile(e2e, 50):.2f} s, p99 {percentile(e2e, 99):.2f} s")
    if refused:
        times = [e for *_, e in refused]
        print(f"503 answered in p50 {percentile(times, 50):.3f} s, p99 {percentile(times, 99):.3f} s")
    for outcome, n in sorted(bad.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n} x {outcome}")
    for p in problems:
        print(f"  after the run: {p}")
    return not bad and not problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", help="model directory (default: the embedded model)")
    ap.add_argument("--server-args", default="", help="extra `mcserve serve` flags, one string")
    ap.add_argument("--client", choices=("httpx", "raw", "both"), default="httpx")
    args = ap.parse_args()

    good = True
    with LiveServer(args.model, tuple(shlex.split(args.server_args))) as srv:
        for client in ("httpx", "raw") if args.client == "both" else (args.client,):
            start = time.monotonic()
            results = asyncio.run(run(srv, client, args.clients, args.max_tokens))
            wall = time.monotonic() - start
            problems = accounted_for(srv.wait_idle())
            label = (f"{args.clients} streaming clients ({client}), max_tokens {args.max_tokens}, "
                     f"server args '{args.server_args}'")
            good = report(label, results, wall, problems) and good
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
