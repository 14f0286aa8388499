"""Draining (server/api/drain.py), the X-Session-Id header, the default output cap and the HTTP
request counters, driven in-process through ASGI against the fake engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcserve.server.api import build_app
from mcserve.server.settings import ApiSettings
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.fake_server import make_app
from tests.server.api.tiny_tokenizer import TinyTokenizer

AUTH = {"Authorization": "Bearer test-key"}
SLOW = {"messages": [{"role": "user", "content": "[[slow]]"}], "max_tokens": 200}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH)


async def _until(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def _events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def test_draining_turns_health_and_new_requests_503_while_in_flight_ones_finish() -> None:
    app, engine = make_app()
    drain = app.state.ctx.drain

    async def run() -> None:
        async with _client(app) as c:
            short = {"messages": [{"role": "user", "content": "[[paced]]"}], "max_tokens": 30, "stream": True}
            streaming = asyncio.ensure_future(c.post("/v1/chat/completions", json=short))
            await _until(lambda: engine.inflight)
            assert drain.in_flight == 1
            assert drain.begin() and not drain.begin()
            health = await c.get("/health")
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            rejected = await c.post("/v1/chat/completions", json={**SLOW, "max_tokens": 1})
            assert rejected.status_code == 503
            assert rejected.headers["retry-after"] == "1" and rejected.headers["connection"] == "close"
            assert rejected.json()["error"]["code"] == "server_draining"
            assert (await c.get("/metrics")).status_code == 200 and (await c.get("/version")).status_code == 200
            assert drain.in_flight == 1  # the rejected request never counted
            done = await streaming
            events = _events(done.text)
            assert events[-1] == "[DONE]" and '"finish_reason":"length"' in events[-2]
            assert await drain.wait_idle(1.0) and drain.in_flight == 0

    asyncio.run(run())
    assert not engine.aborted  # the stream was allowed to finish


def test_expiry_cuts_streams_with_an_error_event_and_done_and_plain_requests_with_503() -> None:
    app, engine = make_app()
    drain = app.state.ctx.drain

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as c:
            stream = asyncio.ensure_future(c.post("/v1/chat/completions", json={**SLOW, "stream": True}))
            plain = asyncio.ensure_future(c.post("/v1/chat/completions", json=SLOW))
            await _until(lambda: len(engine.inflight) == 2)
            drain.begin()
            assert not await drain.wait_idle(0.05)
            assert drain.expire() == 2
            out = await stream, await plain
            assert await drain.wait_idle(1.0)
            return out

    stream, plain = asyncio.run(run())
    events = _events(stream.text)
    assert events[-1] == "[DONE]"
    assert '"code": "server_draining"' in events[-2] and "drain timeout" in events[-2]
    assert len(events) > 3  # some tokens arrived before the cut
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "server_draining"
    assert len(engine.aborted) == 2  # the engine frees both at once


def test_session_id_from_header_body_or_both_and_conflicts_are_400() -> None:
    app, engine = make_app()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def run() -> list[httpx.Response]:
        async with _client(app) as c:
            return [
                await c.post("/v1/chat/completions", json=chat, headers={"X-Session-Id": "from-header"}),
                await c.post("/v1/chat/completions", json={**chat, "session_id": "from-body"}),
                await c.post(
                    "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": "same"},
                    headers={"x-session-id": "same"},
                ),
                await c.post(
                    "/v1/chat/completions", json={**chat, "session_id": "b"}, headers={"X-Session-Id": "a"}
                ),
                await c.post("/v1/chat/completions", json=chat, headers={"X-Session-Id": "x" * 257}),
            ]

    ok_header, ok_body, ok_both, conflict, too_long = asyncio.run(run())
    assert [r.status_code for r in (ok_header, ok_body, ok_both)] == [200, 200, 200]
    assert [r.session_id for r in engine.seen.values()] == ["from-header", "from-body", "same"]
    assert conflict.status_code == 400
    err = conflict.json()["error"]
    assert err["code"] == "session_id_conflict" and err["param"] == "session_id" and "'a'" in err["message"]
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "invalid_session_id"
    assert len(engine.seen) == 3


@pytest.mark.parametrize("cap,expected", [(7, 7), (100_000, None)])
def test_a_chat_without_max_tokens_gets_the_default_cap_or_the_room_left(cap: int, expected: int | None) -> None:
    """(Completions keep OpenAI's own default of 16.)"""
    engine = FakeEngine(TinyTokenizer(), max_model_len=512)
    app = build_app(engine, engine.tokenizer, ApiSettings(default_max_tokens=cap))

    async def run() -> httpx.Response:
        async with _client(app) as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "abc"}]})

    r = asyncio.run(run())
    assert r.status_code == 200
    (seen,) = engine.seen.values()
    expected = expected or 512 - len(seen.prompt_token_ids)
    assert seen.params.max_tokens == expected
    assert r.json()["usage"]["completion_tokens"] == expected


def _http_counts(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mcserve:http_requests_total":
                out[(s.labels["route"], s.labels["status"])] = s.value
    return out


def test_http_requests_are_counted_by_route_template_and_status_from_zero() -> None:
    app, _ = make_app()

    async def run() -> tuple[str, str]:
        async with _client(app) as c:
            before = (await c.get("/metrics")).text
            await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            await c.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
            await c.get("/v1/models/fake-model")
            await c.get("/v1/models/nope")
            await c.get("/no/such/path")
            await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            return before, (await c.get("/metrics")).text

    before, after = asyncio.run(run())
    zero = _http_counts(before)
    assert zero[("/v1/chat/completions", "503")] == 0 and zero[("/v1/completions", "500")] == 0
    assert zero[("/tokenize", "200")] == 0
    delta = {k: v - zero.get(k, 0) for k, v in _http_counts(after).items() if v != zero.get(k, 0)}
    assert delta == {
        ("/v1/chat/completions", "200"): 1,
        ("/v1/chat/completions", "400"): 1,
        ("/v1/models/{model_id}", "200"): 1,
        ("/v1/models/{model_id}", "404"): 1,
        ("other", "404"): 1,
        ("/v1/models", "401"): 1,
        ("/metrics", "200"): 1,  # the first scrape, counted once it had answered
    }
