"""Hostile input against a real `mcserve serve`, with /health polled every 10 ms throughout:

- a 50 MB body (declared by Content-Length, and sent chunked without one): refused with 413 within
  100 ms, RSS growth < 50 MB;
- four 7.9 MB chat prompts at once (under the 8 MiB body limit): 400 context_length_exceeded before
  tokenizing; the same for /tokenize;
- 1M stop_token_ids, 100k messages, a text/plain drive-by POST, duplicate keys, deep nesting;

and /health's slowest answer during all of it. Exit status 0 when every check holds.

    nice python benchmarks/hostile_input.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import time

import httpx
from live_server import LiveServer

MB = 1_000_000


def raw_post(port: int, path: str, headers: dict[str, str], body_size: int, *, chunked: bool) -> tuple[int, float]:
    """POST `body_size` bytes of a JSON string over a plain socket, reading the answer as soon as it
    comes (the server may answer before the body is sent); (status, seconds from the first byte)."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {body_size}\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    start = time.monotonic()
    pending = (head + "\r\n").encode()
    sent, piece = 0, b'{"prompt": "' + b"x" * (1 << 20)
    answer = b""
    while time.monotonic() - start < 30:
        try:
            answer += sock.recv(65536)
            if b"\r\n" in answer:
                break
        except BlockingIOError:
            pass
        if not pending and sent < body_size:
            chunk = piece[: body_size - sent]
            sent += len(chunk)
            pending = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
        if pending:
            try:
                pending = pending[sock.send(pending):]
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.0005)
    took = time.monotonic() - start
    sock.close()
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else -1, took


async def poll_health(url: str, stop: asyncio.Event, worst: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        while not stop.is_set():
            start = time.monotonic()
            r = await c.get(url + "/health")
            took = time.monotonic() - start
            assert r.status_code == 200, r.text
            worst[0] = max(worst[0], took)
            await asyncio.sleep(0.01)


async def hostile(srv: LiveServer, results: dict[str, object]) -> None:
    stop, worst = asyncio.Event(), [0.0]
    poller = asyncio.ensure_future(poll_health(srv.url, stop, worst))
    loop = asyncio.get_running_loop()
    h = {"Authorization": f"Bearer {srv.headers['Authorization'].split()[1]}", "Content-Type": "application/json"}
    for chunked in (False, True):
        rss0 = srv.rss_mb()
        status, took = await loop.run_in_executor(None, lambda c=chunked: raw_post(
            srv.port, "/v1/completions", h, 50 * MB, chunked=c))
        results[f"50 MB body {'chunked' if chunked else 'Content-Length'}"] = (status, took, srv.rss_mb() - rss0)
    async with httpx.AsyncClient(timeout=120, headers=srv.headers) as c:
        big = json.dumps({"messages": [{"role": "user", "content": "a " * 3_950_000}], "max_tokens": 4})
        rss0, start = srv.rss_mb(), time.monotonic()
        rs = await asyncio.gather(*(c.post(srv.url + "/v1/chat/completions", content=big) for _ in range(4)))
        results["4 x 7.9 MB chat prompts"] = ([r.status_code for r in rs], time.monotonic() - start,
                                             srv.rss_mb() - rss0, rs[0].json()["error"]["code"])
        start = time.monotonic()
        r = await c.post(srv.url + "/tokenize", content=json.dumps({"prompt": "b " * 3_950_000}))
        results["7.9 MB /tokenize"] = (r.status_code, time.monotonic() - start, len(r.content))
        start = time.monotonic()
        r = await c.post(srv.url + "/v1/chat/completions", content=json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [5] * 1_000_000}))
        results["1M stop_token_ids"] = (r.status_code, time.monotonic() - start)
        start = time.monotonic()
        r = await c.post(srv.url + "/v1/chat/completions", content=json.dumps(
            {"messages": [{"role": "user", "content": "m"}] * 100_000}))
        results["100k messages"] = (r.status_code, time.monotonic() - start)
        r = await c.post(srv.url + "/v1/chat/completions", content=b'{"messages": []}',
                         headers={"Content-Type": "text/plain"})
        results["text/plain drive-by"] = (r.status_code,)
        r = await c.post(srv.url + "/v1/completions", content=b'{"prompt": "a", "prompt": [1, 2]}')
        results["duplicate keys"] = (r.status_code,)
        r = await c.post(srv.url + "/v1/completions", content=b'{"prompt": ' + b"[" * 1_000_000 + b"]" * 1_000_000
                         + b"}")
        results["1M nested arrays"] = (r.status_code,)
    stop.set()
    await poller
    results["slowest /health during all of it (s)"] = round(worst[0], 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--server-args", default="")
    ap.add_argument("--refuse-within-s", type=float, default=0.1, help="the bar for the 50 MB body's 413")
    args = ap.parse_args()
    results: dict[str, object] = {}
    with LiveServer(args.model, tuple(shlex.split(args.server_args))) as srv:
        asyncio.run(hostile(srv, results))
    for k, v in results.items():
        print(f"{k}: {v}")
    checks = {
        f"50 MB (Content-Length) is 413 within {args.refuse_within_s * 1000:.0f} ms, RSS +<50 MB":
        results["50 MB body Content-Length"][0] == 413
        and results["50 MB body Content-Length"][1] < args.refuse_within_s
        and results["50 MB body Content-Length"][2] < 50,
        "50 MB (chunked) is 413, RSS +<50 MB": results["50 MB body chunked"][0] == 413
        and results["50 MB body chunked"][2] < 50,
        "7.9 MB prompts are 400": results["4 x 7.9 MB chat prompts"][0] == [400] * 4,
        "7.9 MB /tokenize is 400": results["7.9 MB /tokenize"][0] == 400,
        "1M stop_token_ids is 400": results["1M stop_token_ids"][0] == 400,
        "100k messages is 400": results["100k messages"][0] == 400,
        "text/plain is 415": results["text/plain drive-by"][0] == 415,
        "duplicate keys are 400": results["duplicate keys"][0] == 400,
        "deep nesting is 400": results["1M nested arrays"][0] == 400,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
