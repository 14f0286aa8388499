"""`mcserve serve` end to end: the CLI in a subprocess, the real engine, a tiny random model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.api.conftest import REPO_ROOT, free_port, scrape_metrics


@pytest.mark.slow
def test_cli_serves_a_tiny_model(tmp_path: Path) -> None:
    from mcserve.server.model.init_model import init_model

    init_model(tmp_path / "tiny", preset="tiny", mc={"aggregation": "ssc", "top_k": 2}, seed=0)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mcserve.server.cli",
                "serve",
                str(tmp_path / "tiny"),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--max-num-seqs",
                "16",
                "--api-key",
                "k",
                "--log-level",
                "warning",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        messages = [{"role": "user", "content": "Hello, tell me a story about a cat."}]  # > 1 segment (16)
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30)
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage.completion_tokens == 5
        assert usage.prompt_tokens_details.cached_tokens > 0, "the repeat reused the first's checkpoints"
        metrics = scrape_metrics(base, "tiny")
        assert metrics[("mcserve:generation_tokens_total", ())] == 10
        assert metrics[("mcserve:request_queue_time_seconds_count", ())] == 2  # recorded by the engine
        assert "OpenAI base URL" in log_path.read_text()
        _64_concurrent_streams(base, metrics)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _64_concurrent_streams(base: str, before: dict) -> None:
    """64 streaming clients at once through the real engine (16 run, the rest queue): all complete,
    and the server's counters move by exactly what the clients counted."""

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str | None, int, int]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i} says " + "hi " * (i % 9)}],
            max_tokens=3 + i % 5, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish, usage, pieces = None, None, 0
        async for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                pieces += bool(ch.delta.content)
                finish = ch.finish_reason or finish
        assert usage is not None
        return finish, usage.completion_tokens, usage.prompt_tokens

    async def run() -> list[tuple[str | None, int, int]]:
        http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=64))
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=120,
                                      http_client=http) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert [r[1] for r in results] == [3 + i % 5 for i in range(64)]
    assert all(r[0] == "length" for r in results)
    after = scrape_metrics(base, "tiny")

    def moved(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert moved("mcserve:generation_tokens_total") == sum(r[1] for r in results)
    assert moved("mcserve:prompt_tokens_total") == sum(r[2] for r in results)
    assert moved("mcserve:request_success_total", (("finished_reason", "length"),)) == 64
    assert moved("mcserve:e2e_request_latency_seconds_count") == 64
    assert after[("mcserve:num_requests_running", ())] == 0
    assert httpx.get(base + "/health").status_code == 200
