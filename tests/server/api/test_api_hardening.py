"""Hardening of the HTTP front end, in-process: /health's four states, Content-Type, header and body size, API
keys (several, one 401 for every failure, WWW-Authenticate), CORS only when configured, no request
text in the logs unless asked, and prompt preparation off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from mcserve.server.api import build_app
from mcserve.server.api.deferred_engine import DeferredEngine
from mcserve.server.settings import ApiSettings
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.tiny_tokenizer import TinyTokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _app(engine=None, **settings: object):
    engine = engine if engine is not None else FakeEngine(TinyTokenizer())
    return build_app(engine, TinyTokenizer(), ApiSettings(**settings)), engine


def _call(app, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(run())


def test_health_has_four_states_and_is_200_only_when_ready() -> None:
    deferred = DeferredEngine("m")
    app, _ = _app(deferred)
    r = _call(app, "GET", "/health")
    assert (r.status_code, r.json()["status"]) == (503, "loading")
    assert _call(app, "POST", "/v1/chat/completions", json=CHAT).json()["error"]["code"] == "model_loading"
    fake = FakeEngine(TinyTokenizer())
    deferred.attach(fake)
    r = _call(app, "GET", "/health")
    assert (r.status_code, r.json()["status"]) == (200, "ready")
    assert r.json()["watchdog"] == {
        "slow_step_s": 10.0,
        "slow_steps": 0,
        "last_slow_step_s": None,
        "step_running_s": 0.0,
        "stalled": False,
    }
    app.state.ctx.drain.begin()
    r = _call(app, "GET", "/health")
    assert (r.status_code, r.json()["status"]) == (503, "draining")
    refused = _call(app, "POST", "/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
    assert "retry-after" in refused.headers
    fake.dead_error = "the engine loop died: RuntimeError('device lost')"
    r = _call(app, "GET", "/health")
    assert (r.status_code, r.json()["status"]) == (503, "dead") and "device lost" in r.json()["error"]


def test_dead_engine_is_not_reported_as_loading() -> None:
    app, fake = _app()
    fake.dead_error = "the engine loop died: RuntimeError('boom')"
    r = _call(app, "POST", "/v1/chat/completions", json=CHAT)
    assert (
        r.status_code == 503 and r.json()["error"]["code"] == "engine_dead" and "boom" in r.json()["error"]["message"]
    )


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"],
)
def test_generation_needs_a_json_content_type(content_type: str | None) -> None:
    app, fake = _app()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        r = _call(
            app,
            "POST",
            path,
            content=b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "a"}',
            headers=headers,
        )
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert not fake.seen


def test_json_content_type_with_parameters_is_accepted() -> None:
    app, _ = _app()
    r = _call(
        app,
        "POST",
        "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


def test_oversized_headers_are_431() -> None:
    app, _ = _app(max_header_bytes=2048)
    r = _call(app, "GET", "/v1/models", headers={"X-Big": "b" * 3000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert _call(app, "GET", "/v1/models", headers={"X-Small": "s" * 100}).status_code == 200


def test_a_body_without_length_is_refused_at_the_first_piece_past_the_limit() -> None:
    """Through the whole middleware stack: nothing outside the size limit reads the body, and the 413
    goes out as soon as the bytes received pass the limit, not after reading on (a 50 MB chunked body
    costs the reading of 8 MiB and no more)."""
    limit, piece = 64 * 1024, 4096
    app, engine = _app(max_body_bytes=limit)
    pulled, sent = 0, []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * piece, "more_body": True}  # never ends

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 40000), "server": ("test", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert pulled == limit // piece + 1  # the first piece that passes the limit, none after it
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b"request_too_large" in b"".join(m.get("body", b"") for m in sent[1:])
    assert not engine.seen


def test_several_keys_one_401_for_every_failure() -> None:
    app, _ = _app(api_keys=("k-one", "k-two-longer"))
    for key in ("k-one", "k-two-longer"):
        assert _call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    bodies = set()
    for headers in (
        {},
        {"Authorization": "Bearer k-on"},
        {"Authorization": "Bearer k-one-and-more"},
        {"Authorization": "Basic k-one"},
        {"Authorization": "Bearer "},
        {"Authorization": "k-one"},
    ):
        r = _call(app, "GET", "/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        bodies.add(r.text)
    assert len(bodies) == 1  # nothing tells a missing header from a wrong scheme or a wrong key


def test_keys_from_env_and_file(tmp_path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text("# ops\nfile-key\n\n")
    env = {"MCSERVE_API_KEY": "a", "MCSERVE_API_KEYS": "b, c", "MCSERVE_API_KEY_FILE": str(f)}
    assert ApiSettings.from_env(env).api_keys == ("a", "b", "c", "file-key")
    assert ApiSettings.from_env(env, api_keys=("flag",)).api_keys == ("flag",)  # flags replace the environment
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiSettings.from_env({"MCSERVE_API_KEY_FILE": str(empty)})


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_no_cors_unless_origins_are_given() -> None:
    app, _ = _app(api_keys=("k",))
    r = _call(app, "OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code in (401, 405) and not any(h.startswith("access-control-") for h in r.headers)
    r = _call(app, "GET", "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_exactly_the_given_origins() -> None:
    app, _ = _app(api_keys=("k",), allowed_origins=("https://app.example",))
    r = _call(app, "OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = _call(app, "OPTIONS", "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = _call(app, "GET", "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


SECRET = "zebra-17-secret-prompt"


def _traffic(app) -> None:
    ok = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3}
    assert _call(app, "POST", "/v1/chat/completions", json=ok).status_code == 200
    assert _call(app, "POST", "/v1/chat/completions", json={**ok, "stream": True}).status_code == 200
    assert _call(app, "POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 3}).status_code == 200
    bad = {"messages": [{"role": "user", "content": SECRET}, {"role": "system", "content": SECRET}]}
    assert _call(app, "POST", "/v1/chat/completions", json=bad).status_code == 400  # the template refuses
    crash = {"messages": [{"role": "user", "content": SECRET + "[[crash]]"}]}
    assert _call(app, "POST", "/v1/chat/completions", json=crash).status_code == 500
    mid = {"messages": [{"role": "user", "content": SECRET + "[[raise]]"}], "max_tokens": 5, "stream": True}
    assert _call(app, "POST", "/v1/chat/completions", json=mid).status_code == 200
    assert _call(app, "POST", "/tokenize", json={"prompt": SECRET}).status_code == 200


def test_no_request_text_in_logs_unless_log_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _traffic(_app()[0])
    assert caplog.records and SECRET not in caplog.text
    caplog.clear()
    _traffic(_app(log_requests=True)[0])
    assert SECRET in caplog.text and "completion chatcmpl-" in caplog.text


def test_prompt_preparation_does_not_block_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow tokenizer (a stand-in for a long prompt) runs on a worker thread: /health answers
    meanwhile."""
    tok = TinyTokenizer()
    encode = tok.encode

    def slow_encode(text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(1.0)
        return encode(text, add_special_tokens)

    monkeypatch.setattr(tok, "encode", slow_encode)
    app = build_app(FakeEngine(tok), tok, ApiSettings())

    async def run() -> tuple[float, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            slow = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            health = await c.get("/health")
            took = time.monotonic() - start
            assert not slow.done()
            return took, (await slow).status_code, health.status_code

    took, status, health = asyncio.run(run())
    assert health == 200 and status == 200 and took < 0.5
