"""App behaviours that need a specially configured engine, driven in-process through ASGI."""

from __future__ import annotations

import asyncio
import random

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mcserve.server.api import build_app
from mcserve.server.api.deferred_engine import DeferredEngine
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.fake_server import make_app
from tests.server.api.tiny_tokenizer import TinyTokenizer

AUTH = {"Authorization": "Bearer test-key"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH)


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not in metrics")


def test_full_queue_is_503_with_retry_after() -> None:
    app, engine = make_app(max_inflight=1)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as c:
            slow = asyncio.ensure_future(
                c.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "[[slow]]"}], "max_tokens": 4},
                )
            )
            while not engine.inflight:
                await asyncio.sleep(0.005)
            rejected = await c.post("/v1/chat/completions", json=CHAT)
            return rejected, await slow

    rejected, slow = asyncio.run(run())
    assert rejected.status_code == 503 and rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"] == {
        "message": "1 requests in flight (limit 1)",
        "type": "server_overloaded",
        "param": None,
        "code": "queue_full",
    }
    assert slow.status_code == 200 and slow.json()["choices"][0]["finish_reason"] == "length"


def test_loading_engine_is_503_but_health_metrics_version_answer() -> None:
    deferred = DeferredEngine("late-model")
    app = build_app(deferred, TinyTokenizer(), ApiSettings())

    async def run(path: str, method: str = "GET", **kw: object) -> httpx.Response:
        async with _client(app) as c:
            return await c.request(method, path, **kw)

    assert asyncio.run(run("/health")).status_code == 503
    r = asyncio.run(run("/v1/chat/completions", "POST", json=CHAT))
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "model_loading"
    assert asyncio.run(run("/metrics")).status_code == 200
    assert asyncio.run(run("/version")).status_code == 200
    deferred.attach(FakeEngine(TinyTokenizer(), model_name="late-model"))
    assert asyncio.run(run("/health")).status_code == 200
    r = asyncio.run(run("/v1/chat/completions", "POST", json={**CHAT, "model": "late-model"}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_each_app_has_its_own_registry_and_engine_side_metrics_render() -> None:
    metrics = EngineMetrics("fake-model")
    engine = FakeEngine(TinyTokenizer())
    busy = build_app(engine, engine.tokenizer, ApiSettings(), metrics)
    idle, _ = make_app()

    async def run() -> tuple[str, str]:
        async with _client(busy) as c1, _client(idle) as c2:
            assert (await c1.post("/v1/chat/completions", json=CHAT)).status_code == 200
            return (await c1.get("/metrics")).text, (await c2.get("/metrics")).text

    metrics.on_queue_time(0.2)
    metrics.on_preemption(2)
    metrics.on_prefix_cache_query(100, 64)
    metrics.count_eviction("unreferenced", 3)
    metrics.count_offload(1)
    metrics.count_ssc_selections(layer=1, n=8)
    busy_text, idle_text = asyncio.run(run())
    assert _sample(busy_text, "mcserve:generation_tokens_total") == 2
    assert _sample(idle_text, "mcserve:generation_tokens_total") == 0
    assert _sample(busy_text, "mcserve:request_queue_time_seconds_count") == 1
    assert _sample(busy_text, "mcserve:num_preemptions_total") == 2
    assert _sample(busy_text, "mcserve:prefix_cache_queries_total") == 100
    assert _sample(busy_text, "mcserve:prefix_cache_hits_total") == 64
    assert 'mcserve:checkpoint_evictions_total{model_name="fake-model",reason="unreferenced"} 3.0' in busy_text
    assert 'mcserve:checkpoint_offloads_total{model_name="fake-model",reason="pressure"} 1.0' in busy_text
    assert 'mcserve:ssc_selections_total{layer="1",model_name="fake-model"} 8.0' in busy_text
    assert _sample(busy_text, "mcserve:state_slot_usage") == 0.0 and "_created" not in busy_text


def test_completion_with_several_prompts_aborts_all_when_one_fails() -> None:
    app, engine = make_app()

    async def run() -> httpx.Response:
        async with _client(app) as c:
            return await c.post("/v1/completions", json={"prompt": ["[[slow]] a", "b [[raise]]"], "max_tokens": 50})

    r = asyncio.run(run())
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    slow_id = next(rid for rid, req in engine.seen.items() if req.prompt_token_ids[1] == ord("[") + 3)
    assert slow_id in engine.aborted and slow_id in engine.closed_early and not engine.inflight


# fmt: off
_JUNK = [None, True, False, -1, 0, 1, 2.5, -1e308, 1e308, 2**64, -(2**63) - 1, "", "x" * 300, "\u0000", [], [1],
         [-1], ["a"], [[1, 2]], [None], {}, {"a": 1}, {"type": "text"}, {"role": "user"}]
_CHAT_FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user",
                "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
                "ignore_eos", "priority", "session_id", "mc_top_k", "tools", "tool_choice", "response_format"]
_COMP_FIELDS = ["prompt", "max_tokens", "n", "echo", "logprobs", "suffix", "best_of", "stream", "stop", "seed"]
# fmt: on


def test_seeded_junk_never_yields_500() -> None:
    """Valid bodies with one to three fields replaced by junk: every answer is 200 or a 4xx error body."""
    rng = random.Random(0)
    app, _ = make_app()
    cases = []
    for _ in range(300):
        chat = rng.random() < 0.6
        body: dict = (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            if chat
            else {"prompt": "hi", "max_tokens": 3}
        )
        for field in rng.sample(_CHAT_FIELDS if chat else _COMP_FIELDS, rng.randint(1, 3)):
            body[field] = rng.choice(_JUNK)
        body["max_tokens"] = (
            body["max_tokens"] if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 8 else 3
        )  # keep successful runs short; max_tokens' own junk is covered by the error table
        cases.append(("/v1/chat/completions" if chat else "/v1/completions", body))

    async def run() -> list[tuple[dict, httpx.Response]]:
        async with _client(app) as c:
            return [(body, await c.post(path, json=body)) for path, body in cases]

    statuses = []
    for body, r in asyncio.run(run()):
        statuses.append(r.status_code)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses.count(200) > 20 and len(set(statuses)) > 1  # both paths were exercised
