"""Failures through the AsyncEngine and the HTTP layer: a failed request gets an error (an error event
then [DONE] on a stream, an OpenAI error body otherwise), the others and the engine go on; only an
unusable device makes the engine dead, and /health says so."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mcserve.server.api import build_app
from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from tests.server.engine.helpers import GREEDY, generate, make_engine, tokens
from tests.server.engine.test_step_failures import P0, PX, Faulty


@pytest.fixture
def engines():
    started: list[AsyncEngine] = []
    yield started
    for e in started:
        e.shutdown()


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_a_failed_request_leaves_the_engine_ready(model, tokenizer, engines) -> None:
    (want,) = tokens(generate(make_engine(model, tokenizer), [P0]))
    inner = make_engine(model, tokenizer)
    inner.runner.model = Faulty(model)
    engine = AsyncEngine(inner)
    engines.append(engine)

    async def collect(request):
        return [d async for d in engine.generate(request)]

    async def main():
        # r0 decodes by the time x arrives: x's prefill pass holds x alone.
        it = engine.generate(GenerateRequest("r0", tuple(P0), GREEDY))
        seen = [await it.__anext__()]
        while not seen[-1].token_ids:  # the engine acknowledges a request with an empty delta
            seen.append(await it.__anext__())
        x = await collect(GenerateRequest("x", tuple(PX), GREEDY))
        return x, [*seen, *[d async for d in it]]

    x, r0 = asyncio.run(main())
    assert [d.finish_reason for d in x if d.finish_reason] == ["error"] and not any(d.token_ids for d in x)
    assert "injected prefill fault" in x[-1].error
    assert r0[-1].finish_reason == "length" and [t for d in r0 for t in d.token_ids] == want
    assert engine.is_ready and engine.health().state == "ready"
    again = asyncio.run(collect(GenerateRequest("r0-again", tuple(P0), GREEDY)))
    assert [t for d in again for t in d.token_ids] == want
    inner.scheduler.check()


def _app(model, tokenizer, engines, **patch):
    inner = make_engine(model, tokenizer)
    inner.runner.model = Faulty(model)
    engine = AsyncEngine(inner)
    engines.append(engine)
    metrics = EngineMetrics("tiny")
    inner.publisher.metrics = metrics
    return build_app(engine, tokenizer, ApiSettings(), metrics), engine, metrics


def test_http_error_event_then_done_and_a_counted_failure(model, tokenizer, engines) -> None:
    app, engine, metrics = _app(model, tokenizer, engines)
    body = {"prompt": PX, "max_tokens": 5, "temperature": 0}

    async def run():
        async with _client(app) as c:
            streamed = await c.post("/v1/completions", json={**body, "stream": True})
            plain = await c.post("/v1/completions", json=body)
            ok = await c.post("/v1/completions", json={**body, "prompt": P0})
            health = await c.get("/health")
            return streamed, plain, ok, health

    streamed, plain, ok, health = asyncio.run(run())
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "injected prefill fault" in error["message"]
    assert plain.status_code == 500 and "injected prefill fault" in plain.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert health.status_code == 200 and health.json()["status"] == "ready"
    text = metrics.render().decode()
    assert 'mcserve:request_failures_total{model_name="tiny",reason="error"} 2.0' in text
    assert 'mcserve:request_failures_total{model_name="tiny",reason="oom"} 0.0' in text


def test_an_unusable_device_makes_health_dead(model, tokenizer, engines, monkeypatch) -> None:
    monkeypatch.setattr("mcserve.server.engine.llm_engine.device_usable", lambda device: False)
    app, engine, _ = _app(model, tokenizer, engines)

    async def run():
        async with _client(app) as c:
            failed = await c.post("/v1/completions", json={"prompt": PX, "max_tokens": 5})
            health = await c.get("/health")
            later = await c.post("/v1/completions", json={"prompt": P0, "max_tokens": 5})
            return failed, health, later

    failed, health, later = asyncio.run(run())
    assert failed.status_code == 500 and "device is unusable" in failed.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert later.status_code == 503 and "restart" in later.json()["error"]["message"]
    assert engine.health().state == "dead" and not engine.is_ready
