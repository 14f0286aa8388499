"""Load generator and benchmark for mcserve (or any OpenAI-compatible server).

    mcserve-bench --url http://127.0.0.1:8000 --concurrency 16 --requests 200 --prompt-len 64:512 --output-len 128
    mcserve-bench --turns 8 --session --concurrency 8 --requests 64      # multi-turn chats: prefix reuse
    mcserve-bench --rate 4 --duration 60                                  # Poisson arrivals for a minute

`concurrency` streaming clients share one budget of requests (`--requests`) and time (`--duration`:
no request starts after it; one in flight gets at most `--request-timeout` more), so a run is always
bounded in count and time. Without `--rate` each client sends its next request as soon as the last
one ended (closed loop); with it, request starts follow a Poisson process of that rate and
`concurrency` only caps how many are in flight (a request that arrives while every client is busy
waits for one; its latencies count from when it is sent). With `--turns T` each client holds
conversations of T turns, resending the whole history each turn as chat clients do, which exercises
prefix reuse.
Requests go only to `--url` (no proxies from the environment, no redirects).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mcserve.clients.bench_report import RequestRecord, markdown, summarize
from mcserve.clients.workload import ENDPOINTS, MAX_DURATION_S, MAX_REQUESTS, LengthDist, LoadConfig, random_words


@dataclass(frozen=True, slots=True)
class LoadResult:
    config: LoadConfig
    model: str
    wall_s: float
    records: tuple[RequestRecord, ...]

    def summary(self) -> dict:
        return summarize(list(self.records), self.wall_s)

    def as_json(self) -> dict:
        return _finite_or_none(
            {
                "config": self.config.as_json(),
                "model": self.model,
                "summary": self.summary(),
                "requests": [dataclasses.asdict(r) for r in self.records],
            }
        )


class LoadGenError(RuntimeError):
    """The run cannot start (e.g. the server does not list a model)."""


class _Failed(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Progress:
    """What one request has received so far (kept when it fails midway)."""

    t0: float
    first: float | None = None
    last: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    usage: dict | None = None
    chunks: int = 0

    def on_text(self, piece: str, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.itl.append(now - self.last)  # type: ignore[operator]
        self.last = now
        self.text.append(piece)
        self.chunks += 1


def _finite_or_none(x: object) -> object:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class LoadGenerator:
    """Runs one `LoadConfig` over an httpx client; `run()` returns the records."""

    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, model: str) -> None:
        self.cfg, self.client, self.model = cfg, client, model
        self.records: list[RequestRecord] = []
        self.issued = 0
        self._conversations = 0
        self._start = 0.0
        self._deadline = 0.0
        self._next_arrival = 0.0
        self._arrivals = random.Random(f"{cfg.seed}-arrivals")
        rng = random.Random(f"{cfg.seed}-prefix")
        shared = random_words(rng, cfg.shared_prefix_len)
        self.prefix = " ".join(p for p in (cfg.prefix_text, shared) if p)

    async def run(self) -> float:
        """Send everything; returns the wall time in seconds."""
        cfg = self.cfg
        self._start = self._next_arrival = time.perf_counter()
        self._deadline = self._start + cfg.duration_s
        tasks = [asyncio.ensure_future(self._client_loop()) for _ in range(cfg.concurrency)]
        # Every request stops by its own timeout; this outer bound only guards against a bug.
        done, pending = await asyncio.wait(tasks, timeout=cfg.duration_s + cfg.request_timeout_s + 10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            t.result()  # a bug in a client loop surfaces here
        return time.perf_counter() - self._start

    def _reserve(self, turns: int) -> int:
        """Claim up to `turns` requests of the budget for one conversation (0: the budget or the time
        is spent). A conversation claims its turns up front, so that `max_requests = C x turns`
        gives C whole conversations whatever the order in which the clients finish."""
        if time.perf_counter() >= self._deadline:
            return 0
        k = min(turns, self.cfg.max_requests - self.issued)
        self.issued += k
        return k

    async def _arrive(self) -> bool:
        """Wait for the next Poisson arrival when rate-limited; False once the time limit has passed."""
        if self.cfg.rate is not None:
            self._next_arrival += self._arrivals.expovariate(self.cfg.rate)
            await asyncio.sleep(max(0.0, self._next_arrival - time.perf_counter()))
        return time.perf_counter() < self._deadline

    async def _client_loop(self) -> None:
        cfg = self.cfg
        while True:
            claimed = self._reserve(cfg.turns)
            if not claimed:
                return
            conv = self._conversations
            self._conversations += 1
            rng = random.Random(f"{cfg.seed}-conversation-{conv}")
            messages: list[dict] = [{"role": "system", "content": self.prefix}] if self.prefix else []
            for turn in range(claimed):
                if not await self._arrive():
                    self.issued -= claimed - turn  # unsent turns go back (nobody can use them now)
                    return
                words = random_words(rng, cfg.prompt_len.sample(rng))
                body: dict = {
                    "model": self.model,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": cfg.output_len.sample(rng),
                    "temperature": cfg.temperature,
                }
                if cfg.ignore_eos:
                    body["ignore_eos"] = True
                if cfg.session_ids:
                    body["session_id"] = f"loadgen-{cfg.seed}-{conv}"
                if cfg.endpoint == "chat":
                    messages.append({"role": "user", "content": words})
                    body["messages"] = messages
                else:
                    body["prompt"] = f"{self.prefix} {words}" if self.prefix else words
                record, answer = await self._request(conv, turn, body)
                self.records.append(record)
                if not record.ok:
                    self.issued -= claimed - turn - 1  # its remaining turns go back to the budget
                    break  # the conversation is broken; start a new one
                messages.append({"role": "assistant", "content": answer})

    async def _request(self, conv: int, turn: int, body: dict) -> tuple[RequestRecord, str]:
        p = _Progress(time.perf_counter())
        status, error = "200", None
        try:
            await asyncio.wait_for(self._stream(body, p), self.cfg.request_timeout_s)
        except _Failed as e:
            status, error = e.status, str(e)
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            status, error = "timeout", f"{type(e).__name__} after {time.perf_counter() - p.t0:.1f} s"
        except httpx.TransportError as e:
            status, error = "connection", f"{type(e).__name__}: {e}"
        except asyncio.CancelledError:
            self.records.append(self._record(conv, turn, p, "cancelled", "the run's time limit passed"))
            raise
        return self._record(conv, turn, p, status, error), "".join(p.text)

    def _record(self, conv: int, turn: int, p: _Progress, status: str, error: str | None) -> RequestRecord:
        usage = p.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        return RequestRecord(
            conversation=conv,
            turn=turn,
            start_s=p.t0 - self._start,
            status=status,
            e2e_s=time.perf_counter() - p.t0,
            ttft_s=None if p.first is None else p.first - p.t0,
            itl_s=tuple(p.itl),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", p.chunks),
            cached_tokens=details.get("cached_tokens"),
            error=error,
            chunks=p.chunks,
        )

    async def _stream(self, body: dict, p: _Progress) -> None:
        chat = self.cfg.endpoint == "chat"
        async with self.client.stream("POST", ENDPOINTS[self.cfg.endpoint], json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _Failed(str(response.status_code), _error_message(response))
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:  # comments (keep-alive pings) and other fields
                    continue
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise _Failed("stream_error", str((event["error"] or {}).get("message")))
                if event.get("usage"):
                    p.usage = event["usage"]
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        p.on_text(piece, time.perf_counter())


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise LoadGenError(f"GET /v1/models: {response.status_code} {_error_message(response)}")
    data = response.json().get("data") or []
    if not data:
        raise LoadGenError("GET /v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def run_load(cfg: LoadConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> LoadResult:
    """Run `cfg` against its URL (`transport`: for tests, replaces the network)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(
        base_url=cfg.base_url,
        headers=headers,
        timeout=httpx.Timeout(cfg.request_timeout_s, connect=min(10.0, cfg.request_timeout_s)),
        limits=httpx.Limits(max_connections=cfg.concurrency + 1, max_keepalive_connections=cfg.concurrency + 1),
        trust_env=False,
        follow_redirects=False,
        transport=transport,
    ) as client:
        model = cfg.model or await first_model(client)
        gen = LoadGenerator(cfg, client, model)
        wall = await gen.run()
    return LoadResult(cfg, model, wall, tuple(sorted(gen.records, key=lambda r: r.start_s)))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mcserve-bench",
        description="Benchmark an OpenAI-compatible server with concurrent streaming clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    ap.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    ap.add_argument("--concurrency", "-c", type=int, default=8, help="streaming clients (requests in flight)")
    ap.add_argument(
        "--requests",
        "-n",
        type=int,
        default=None,
        help=f"requests in all (default 64, or {MAX_REQUESTS} with --duration)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds after which no request starts (default {MAX_DURATION_S / 24:g})",
    )
    ap.add_argument("--rate", type=float, default=None, help="Poisson request rate per second (default: closed loop)")
    ap.add_argument("--prompt-len", default="128", help="words per user message: 128, 64:256, normal:128:32, exp:128")
    ap.add_argument("--output-len", default="64", help="max_tokens per request, same forms")
    ap.add_argument("--turns", type=int, default=1, help="turns per conversation (history is resent each turn)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="random words common to every request")
    ap.add_argument("--prefix-text", default="", help="literal text at the start of every request")
    ap.add_argument("--session", action="store_true", help="send session_id per conversation (mcserve extension)")
    ap.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (for servers that reject vLLM's extras)",
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", "-o", default="mcserve-bench.json", help="JSON result file ('' for none)")
    return ap


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    requests = args.requests if args.requests is not None else (64 if args.duration is None else MAX_REQUESTS)
    return LoadConfig(
        url=args.url,
        api_key=args.api_key,
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        max_requests=requests,
        duration_s=args.duration if args.duration is not None else MAX_DURATION_S / 24,
        rate=args.rate,
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len),
        turns=args.turns,
        shared_prefix_len=args.shared_prefix,
        prefix_text=args.prefix_text,
        session_ids=args.session,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"mcserve-bench: {cfg.base_url} {cfg.endpoint}, {cfg.concurrency} clients, at most {cfg.max_requests} "
        f"requests / {cfg.duration_s:g} s, prompt {cfg.prompt_len.describe()} words, output "
        f"{cfg.output_len.describe()} tokens, {cfg.turns} turn(s)" + (f", {cfg.rate:g} req/s" if cfg.rate else ""),
        file=sys.stderr,
    )
    try:
        result = asyncio.run(run_load(cfg))
    except (LoadGenError, httpx.HTTPError) as e:
        print(f"mcserve-bench: {e}", file=sys.stderr)
        return 2
    print(f"model {result.model}\n")
    print(markdown(result.summary()))
    if args.output:
        Path(args.output).write_text(json.dumps(result.as_json(), indent=1) + "\n")
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
