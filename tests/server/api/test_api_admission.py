"""Admission (server/api/admission.py): an overloaded server refuses before the text worker has done
anything for the request, and no path leaves a sequence counted in `Admission.pending`.

The chat template of `HeldTokenizer` blocks on an event for messages marked [[hold]], so requests can
be kept inside the text worker for as long as a test needs; the fake engine's `num_waiting` plays the
engine's waiting queue."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from mcserve.server.api import build_app
from mcserve.server.api.admission import Admission
from mcserve.server.settings import ApiSettings
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.tiny_tokenizer import TinyTokenizer

AUTH = {"Authorization": "Bearer test-key"}
HOLD = {"role": "user", "content": "[[hold]] [[slow]] hi"}


class HeldTokenizer(TinyTokenizer):
    """TinyTokenizer whose template waits for `release` on a [[hold]] message (a deliberately slow
    templating step); `started` / `rendered` count the template calls begun and finished."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.rendered = 0
        self._lock = threading.Lock()

    def apply_chat_template(self, messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> str:
        with self._lock:
            self.started += 1
        if any("[[hold]]" in str(m["content"]) for m in messages):
            assert self.release.wait(30), "the test never released the template"
        out = super().apply_chat_template(messages, *args, **kwargs)
        with self._lock:
            self.rendered += 1
        return out


def _app(max_waiting: int) -> tuple[Any, FakeEngine, HeldTokenizer, Admission]:
    tok = HeldTokenizer()
    engine = FakeEngine(tok, max_model_len=512, max_waiting=max_waiting)
    app = build_app(engine, tok, ApiSettings(api_keys=("test-key",)))
    return app, engine, tok, app.state.ctx.admission


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH, timeout=30)


def _chat(messages: list[dict], **extra: Any) -> dict:
    return {"messages": messages, "max_tokens": 3, **extra}


async def _until(cond: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _run(test: Callable[[], Awaitable[None]], tok: HeldTokenizer) -> None:
    try:
        asyncio.run(test())
    finally:
        tok.release.set()  # never leave a worker thread blocked


def test_full_queue_is_refused_while_the_text_worker_is_still_templating() -> None:
    app, engine, tok, admission = _app(max_waiting=2)

    async def test() -> None:
        async with _client(app) as c:
            held = [asyncio.ensure_future(c.post("/v1/chat/completions", json=_chat([HOLD])))
                    for _ in range(2)]
            await _until(lambda: admission.pending == 2 and tok.started >= 1, "two admitted, one templating")
            r = await asyncio.wait_for(
                c.post("/v1/chat/completions", json=_chat([{"role": "user", "content": "hi"}])), 5
            )
            assert not tok.release.is_set() and tok.rendered == 0  # refused before any template finished
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "server_overloaded" and err["code"] == "queue_full"
            assert "2 more sequences are being prepared" in err["message"]
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            tok.release.set()
            for f in held:
                assert (await f).status_code == 200
        assert admission.pending == 0 and not engine.inflight

    _run(test, tok)


def test_free_running_places_count_as_room() -> None:
    """An idle server with max_waiting=1 and one running place takes two requests at once."""
    app, engine, tok, admission = _app(max_waiting=1)
    engine.max_num_seqs = 1

    async def test() -> None:
        async with _client(app) as c:
            held = [asyncio.ensure_future(c.post("/v1/chat/completions", json=_chat([HOLD])))
                    for _ in range(2)]
            await _until(lambda: admission.pending == 2, "two admitted")
            r = await c.post("/v1/chat/completions", json=_chat([{"role": "user", "content": "hi"}]))
            assert r.status_code == 503 and "1 running places are free" in r.json()["error"]["message"], r.text
            tok.release.set()
            for f in held:
                assert (await f).status_code == 200
        assert admission.pending == 0

    _run(test, tok)


def test_the_real_count_is_checked_after_parsing_before_templating() -> None:
    app, engine, tok, admission = _app(max_waiting=4)
    engine.num_waiting = 2
    hi = [{"role": "user", "content": "hi"}]

    async def test() -> None:
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json=_chat(hi, n=3))  # 2 waiting + 3 > 4
            assert r.status_code == 503 and "no room for 3 more" in r.json()["error"]["message"], r.text
            assert tok.started == 0
            r = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
            assert r.status_code == 503 and "no room for 3 more" in r.json()["error"]["message"], r.text
            r = await c.post("/v1/chat/completions", json=_chat(hi, n=5))  # more than the queue holds at all
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            r = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
            assert r.status_code == 400 and "6 sequences" in r.json()["error"]["message"], r.text
            assert tok.started == 0
            r = await c.post("/v1/chat/completions", json=_chat(hi, n=2))  # 2 + 2 fits
            assert r.status_code == 200 and len(r.json()["choices"]) == 2
            r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert admission.pending == 0

    _run(test, tok)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"messages": "not a list"}, 400),  # validation, after admission
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400),
        ("/v1/chat/completions", _chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
         400),  # the template refuses it
        ("/v1/completions", {"prompt": "x" * 600}, 400),  # context length, after tokenizing
        ("/v1/chat/completions", _chat([{"role": "user", "content": "[[invalid]]"}]), 400),  # engine refuses
        ("/v1/chat/completions", _chat([{"role": "user", "content": "[[crash]]"}]), 500),  # engine raises
        ("/v1/chat/completions", _chat([{"role": "user", "content": "[[error]]"}], max_tokens=5), 500),
        ("/v1/completions", {"prompt": "[[raise]]", "max_tokens": 5}, 500),  # engine raises mid-run
    ],
)
def test_no_path_leaves_a_sequence_admitted(path: str, body: dict, status: int) -> None:
    app, engine, tok, admission = _app(max_waiting=8)

    async def test() -> None:
        async with _client(app) as c:
            r = await c.post(path, json=body)
            assert r.status_code == status, r.text
            assert admission.pending == 0
            r = await c.post(path, json={**body, "stream": True})
            assert admission.pending == 0
        assert not engine.inflight

    _run(test, tok)


def _scope(path: str, body: bytes) -> dict:
    headers = [(b"host", b"test"), (b"authorization", b"Bearer test-key"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 40000), "server": ("test", 80)}


class RawCall:
    """One request driven through the ASGI app by hand (httpx's ASGITransport buffers whole responses):
    the client leaves when `gone` is set."""

    def __init__(self, app: Any, path: str, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.gone = asyncio.Event()
        self.sent: list[dict] = []
        self._messages = [{"type": "http.request", "body": raw, "more_body": False}]
        self.task = asyncio.ensure_future(app(_scope(path, raw), self._receive, self._send))

    async def _receive(self) -> dict:
        if self._messages:
            return self._messages.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)


@pytest.mark.parametrize("stream", [False, True])
def test_a_running_request_holds_no_admission(stream: bool) -> None:
    """Given back once the engine has queued it (then the engine counts it); its exact check stays."""
    app, engine, tok, admission = _app(max_waiting=8)
    engine.max_inflight = 1  # the engine's own check refuses the second

    async def test() -> None:
        call = RawCall(app, "/v1/chat/completions",
                       _chat([{"role": "user", "content": "[[slow]]"}], max_tokens=200, stream=stream))
        await _until(lambda: bool(engine.inflight), "the request to run")
        await _until(lambda: admission.pending == 0, "the ticket back (the fake accepts with its first token)", 5)
        assert engine.inflight and not call.task.done()  # still running: 200 tokens at 50 ms
        async with _client(app) as c:
            refused = await c.post("/v1/chat/completions", json=_chat([{"role": "user", "content": "hi"}]))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert admission.pending == 0
        call.gone.set()
        await asyncio.wait_for(call.task, 10)
        assert call.status == (200 if stream else 499)
        await _until(lambda: not engine.inflight, "the abort")
        assert admission.pending == 0

    _run(test, tok)


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_while_the_text_worker_holds_its_request(stream: bool) -> None:
    """The ticket stays while the worker still does the request's work (that is what it bounds), and is
    given back when the work ends; the engine request, if any, is aborted."""
    app, engine, tok, admission = _app(max_waiting=4)

    async def test() -> None:
        call = RawCall(app, "/v1/chat/completions", _chat([HOLD], max_tokens=40, stream=stream))
        await _until(lambda: tok.started == 1, "the template to start")
        call.gone.set()
        await asyncio.sleep(0.05)
        assert admission.pending == 1 and not call.task.done()
        tok.release.set()
        await asyncio.wait_for(call.task, 10)
        assert admission.pending == 0
        await _until(lambda: not engine.inflight, "nothing in flight")
        assert call.status in (200, 499)
        assert not engine.completed  # it was cut, not served to its end

    _run(test, tok)
