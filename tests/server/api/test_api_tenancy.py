"""Tenancy of the prefix cache through HTTP with the real engine (tiny random model, in-process
ASGI): the API key, `cache_salt` and `session_id` decide who shares cached prefixes, and usage's
`cached_tokens` tells a tenant nothing about another's prompts."""

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

KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tenancy") / "tiny"
    init_model(path, preset="tiny", mc={"aggregation": "ssc", "segment_size": 16, "top_k": 2}, seed=0)
    tokenizer = Tokenizer.from_dir(path)
    engine = AsyncEngine(make_engine(load_model(path, dtype=torch.float32, device="cpu"), tokenizer))
    yield build_app(engine, tokenizer, ApiSettings(api_keys=KEYS))
    engine.shutdown()


def _cached(app, key: str, prompt: list[int], **extra: object) -> int:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            return await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                         "ignore_eos": True, **extra})

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenant_b_learns_nothing_of_tenant_a_prefixes(app) -> None:
    prompt = [random.Random(0).randrange(3, 500) for _ in range(70)]
    assert _cached(app, "key-a", prompt) == 0
    assert _cached(app, "key-b", prompt) == 0  # the same tokens under another key: no hit
    assert _cached(app, "key-a", prompt) == 64  # the owner reuses its 4 whole segments
    assert _cached(app, "key-a", prompt, cache_salt="x") == 0  # a salt is a tenant of its own
    assert _cached(app, "key-a", prompt, cache_salt="x") == 64


def test_a_session_is_found_only_with_the_key_that_created_it(app) -> None:
    prompt = [random.Random(1).randrange(3, 500) for _ in range(40)]
    assert _cached(app, "key-a", prompt, session_id="chat-1") == 0
    assert _cached(app, "key-b", prompt, session_id="chat-1") == 0
    assert _cached(app, "key-a", prompt) == 0  # outside the session: not shared either
    assert _cached(app, "key-a", prompt, session_id="chat-1") == 32


def test_cache_salt_is_validated(app) -> None:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": "Bearer key-a"}) as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 1, "cache_salt": 5})

    r = asyncio.run(run())
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
