"""64 concurrent streaming clients complete, and /metrics agrees with what they counted."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from tests.server.api.conftest import LiveServer, scrape_metrics

CLIENTS = 64


def scrape(live: LiveServer) -> dict[tuple[str, tuple], float]:
    return scrape_metrics(live.base_url, "fake-model")


def _diff(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def _one(client: openai.AsyncOpenAI, i: int) -> dict:
    max_tokens = 5 + i % 7
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": f"[[paced]] client {i} " + "w" * (i % 13)}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return {"text": text, "finish": finish, "usage": usage, "max_tokens": max_tokens}


def test_64_concurrent_streams_and_metrics_agree(live_server: LiveServer) -> None:
    deadline = time.monotonic() + 5
    while live_server.fake_request("none")["inflight"] and time.monotonic() < deadline:
        time.sleep(0.02)  # earlier tests' aborted requests have drained
    before = scrape(live_server)

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with openai.AsyncOpenAI(
            base_url=live_server.v1,
            api_key=live_server.api_key,
            max_retries=0,
            timeout=30,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        ) as c:
            return await asyncio.gather(*(_one(c, i) for i in range(CLIENTS)))

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    after = scrape(live_server)

    assert all(r["finish"] == "length" and len(r["text"]) == r["max_tokens"] for r in results)
    assert all(r["usage"].completion_tokens == r["max_tokens"] for r in results)
    prompt = sum(r["usage"].prompt_tokens for r in results)
    generated = sum(r["usage"].completion_tokens for r in results)
    assert _diff(after, before, "mcserve:prompt_tokens_total") == prompt
    assert _diff(after, before, "mcserve:generation_tokens_total") == generated
    assert _diff(after, before, "mcserve:request_success_total", finished_reason="length") == CLIENTS
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert _diff(after, before, f"mcserve:{hist}_count") == CLIENTS
        assert 0 < _diff(after, before, f"mcserve:{hist}_sum") <= CLIENTS * elapsed
    assert _diff(after, before, "mcserve:inter_token_latency_seconds_count") == generated - CLIENTS
    assert after[("mcserve:num_requests_running", ())] == 0
    assert live_server.fake_request("none")["peak_inflight"] >= CLIENTS // 2, "the clients did overlap"
    assert live_server.health() == 200
