"""The load generator of `mcserve-bench` (the command: clients/bench_cli.py), for mcserve or any
OpenAI-compatible server.

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

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from mcserve.clients.bench_report import RequestRecord, summarize
from mcserve.clients.dataset import Conversation, load_dataset, random_conversation, shared_prefixes
from mcserve.clients.tokens import choose_tokenizer
from mcserve.clients.workload import ENDPOINTS, LoadConfig

SESSION_HEADER = "X-Session-Id"


@dataclass(frozen=True, slots=True)
class LoadResult:
    config: LoadConfig
    model: str
    wall_s: float
    records: tuple[RequestRecord, ...]
    tokenizer: str = "words"
    server_version: str | None = None

    def summary(self) -> dict:
        return summarize(
            list(self.records), self.wall_s, self.config.percentiles, dict(self.config.goodput_slos_ms)
        )

    def as_json(self) -> dict:
        return _finite_or_none(
            {
                "config": self.config.as_json(),
                "model": self.model,
                "tokenizer": self.tokenizer,
                "server_version": self.server_version,
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

    def __init__(
        self,
        cfg: LoadConfig,
        client: httpx.AsyncClient,
        model: str,
        conversation: Callable[[int], Awaitable[Conversation]],
        turns: Callable[[int], int],
        on_record: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        """`conversation(k)`: what the k-th conversation sends (built before its first request);
        `turns(k)`: how many turns it has, known up front so that its requests are claimed first."""
        self.cfg, self.client, self.model = cfg, client, model
        self.conversation, self.turns = conversation, turns
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self.issued = 0
        self._conversations = 0
        self._start = 0.0
        self._deadline = 0.0
        self._next_arrival = 0.0
        self._arrivals = random.Random(f"{cfg.seed}-arrivals")

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
            conv = self._conversations
            claimed = self._reserve(self.turns(conv))  # no await since reading conv: numbers stay dense
            if not claimed:
                return
            self._conversations += 1
            script = await self.conversation(conv)
            rng = random.Random(f"{cfg.seed}-lengths-{conv}")
            system = "\n".join(p for p in (script.prefix, script.system) if p)
            messages: list[dict] = [{"role": "system", "content": system}] if system else []
            for turn in range(claimed):
                if not await self._arrive():
                    self.issued -= claimed - turn  # unsent turns go back (nobody can use them now)
                    return
                step = script.turns[turn]
                body: dict = {
                    "model": self.model,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": step.max_tokens or cfg.output_len.sample(rng),
                    "temperature": cfg.temperature,
                }
                if cfg.ignore_eos:
                    body["ignore_eos"] = True
                headers = {}
                if cfg.session_ids:  # the header for a session-affine router, the body for mcserve
                    body["session_id"] = headers[SESSION_HEADER] = f"loadgen-{cfg.seed}-{conv}"
                if cfg.endpoint == "chat":
                    messages.append({"role": "user", "content": step.text})
                    body["messages"] = messages
                else:
                    body["prompt"] = f"{system} {step.text}" if system else step.text
                record, answer = await self._request(conv, turn, body, headers)
                self.records.append(record)
                if self.on_record is not None:
                    self.on_record(record)
                if not record.ok:
                    self.issued -= claimed - turn - 1  # its remaining turns go back to the budget
                    break  # the conversation is broken; start a new one
                messages.append({"role": "assistant", "content": answer})

    async def _request(self, conv: int, turn: int, body: dict, headers: dict) -> tuple[RequestRecord, str]:
        p = _Progress(time.perf_counter())
        status, error = "200", None
        try:
            await asyncio.wait_for(self._stream(body, headers, p), self.cfg.request_timeout_s)
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

    async def _stream(self, body: dict, headers: dict, p: _Progress) -> None:
        chat = self.cfg.endpoint == "chat"
        async with self.client.stream("POST", ENDPOINTS[self.cfg.endpoint], json=body, headers=headers) as response:
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


async def server_version(client: httpx.AsyncClient) -> str | None:
    """GET /version's "version" (mcserve, vLLM), None where the server has none."""
    try:
        r = await client.get("/version")
        return str(r.json()["version"]) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def run_load(
    cfg: LoadConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Run `cfg` against its URL (`transport`: for tests, replaces the network). The conversations are
    built (tokenizing through the server if so chosen) before the clock starts."""
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
        version = await server_version(client)
        tok = await choose_tokenizer(cfg.tokenizer, client, model)
        if cfg.dataset is not None:
            scripts = await load_dataset(cfg.dataset, cfg.dataset_format, tok, cfg)

            async def conversation(k: int) -> Conversation:
                return scripts[k % len(scripts)]

            def turns(k: int) -> int:
                return len(scripts[k % len(scripts)].turns)
        else:
            prefixes = await shared_prefixes(tok, cfg)

            async def conversation(k: int) -> Conversation:
                return await random_conversation(tok, cfg, k, prefixes)

            def turns(k: int) -> int:
                return cfg.turns

        gen = LoadGenerator(cfg, client, model, conversation, turns, on_record)
        wall = await gen.run()
    records = tuple(sorted(gen.records, key=lambda r: r.start_s))
    return LoadResult(cfg, model, wall, records, tok.name, version)
