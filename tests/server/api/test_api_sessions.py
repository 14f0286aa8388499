"""`/v1/sessions` through HTTP with the real engine (tiny random model, in-process ASGI): save, list
and delete see only the caller's own sessions; a saved session survives a new engine on the same
`--session-dir`; a corrupt file fails only the requests that name it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
import torch

from mcserve.server.api import build_app
from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_model
from mcserve.server.settings import ApiSettings
from mcserve.server.text.tokenizer import Tokenizer
from tests.server.engine.helpers import make_engine

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sessions-api") / "tiny"
    init_model(path, preset="tiny", mc={"aggregation": "ssc", "segment_size": 16, "top_k": 2}, seed=0)
    return path


def _server(path: Path, session_dir: Path):
    tokenizer = Tokenizer.from_dir(path)
    engine = AsyncEngine(make_engine(load_model(path, dtype=torch.float32, device="cpu"), tokenizer),
                         session_dir=session_dir, session_save_interval_s=0)
    return engine, build_app(engine, tokenizer, ApiSettings(api_keys=KEYS))


def _call(app, key: str, method: str, path: str, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            return await c.request(method, path, **kw)

    return asyncio.run(run())


def _complete(app, key: str, prompt: list[int], session_id: str) -> httpx.Response:
    return _call(app, key, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                            "ignore_eos": True, "session_id": session_id})


def test_save_list_delete_are_per_key_and_survive_a_new_engine(model_path, tmp_path) -> None:
    prompt = [random.Random(2).randrange(3, 500) for _ in range(50)]
    engine, app = _server(model_path, tmp_path)
    try:
        first = _complete(app, "key-a", prompt, "chat-1")
        assert first.status_code == 200, first.text
        listed = _call(app, "key-a", "GET", "/v1/sessions").json()
        assert listed == {"object": "list", "data": [{"id": "chat-1", "object": "session", "in_memory": True,
                                                      "saved_at": None, "tokens": None}]}
        assert _call(app, "key-b", "GET", "/v1/sessions").json()["data"] == []
        assert _call(app, "key-b", "POST", "/v1/sessions/chat-1/save").status_code == 404
        saved = _call(app, "key-a", "POST", "/v1/sessions/chat-1/save")
        assert saved.status_code == 200, saved.text
        body = saved.json()
        assert (body["object"], body["tokens"], body["checkpoints"], body["snapshot"]) == ("session.saved", 55, 3,
                                                                                           True)
        assert _call(app, "key-a", "GET", "/v1/sessions").json()["data"][0]["saved_at"] == body["saved_at"]
        assert _call(app, "key-a", "POST", "/v1/sessions/" + "x" * 300 + "/save").status_code == 400
    finally:
        engine.shutdown()

    again_engine, again = _server(model_path, tmp_path)
    try:
        assert _call(again, "key-a", "GET", "/v1/sessions").json()["data"] == [
            {"id": "chat-1", "object": "session", "in_memory": False, "saved_at": body["saved_at"], "tokens": 55}]
        r = _complete(again, "key-a", prompt + [7, 8, 9], "chat-1")  # restored lazily, before admission
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
        assert _complete(again, "key-b", prompt + [7, 8, 9], "chat-1").json()["usage"]["prompt_tokens_details"][
            "cached_tokens"] == 0  # the same id under another key is another session
        assert _call(again, "key-b", "DELETE", "/v1/sessions/chat-1").status_code == 200  # key-b's own
        assert _call(again, "key-a", "DELETE", "/v1/sessions/chat-1").json() == {
            "id": "chat-1", "object": "session.deleted", "deleted": True}
        assert _call(again, "key-a", "DELETE", "/v1/sessions/chat-1").status_code == 404
        assert _call(again, "key-a", "GET", "/v1/sessions").json()["data"] == []
        assert not list(tmp_path.glob("*.mcsession"))
        r = _complete(again, "key-a", prompt + [7, 8, 9], "chat-1")
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # nothing cached survived
    finally:
        again_engine.shutdown()


def test_a_corrupt_file_fails_only_the_requests_naming_it(model_path, tmp_path) -> None:
    prompt = [random.Random(3).randrange(3, 500) for _ in range(40)]
    engine, app = _server(model_path, tmp_path)
    try:
        assert _complete(app, "key-a", prompt, "chat-2").status_code == 200
        assert _call(app, "key-a", "POST", "/v1/sessions/chat-2/save").status_code == 200
    finally:
        engine.shutdown()
    (path,) = tmp_path.glob("*.mcsession")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    engine, app = _server(model_path, tmp_path)
    try:
        r = _complete(app, "key-a", prompt, "chat-2")
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "session_file_invalid" and "checksum" in err["message"], err
        assert _complete(app, "key-a", prompt, "chat-3").status_code == 200  # the server serves on
        assert _call(app, "key-a", "GET", "/health").status_code == 200
        assert _call(app, "key-a", "DELETE", "/v1/sessions/chat-2").status_code == 200  # discards the file
        assert _complete(app, "key-a", prompt, "chat-2").status_code == 200
    finally:
        engine.shutdown()
