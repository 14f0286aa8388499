"""X-Request-Id, stream headers at acceptance, and an `n` that can never fit: real engine, tiny model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.api.tiny_live import MODEL, client, tiny_server

ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server(tmp_path_factory.mktemp("flow") / "model", max_num_seqs=1, max_waiting=4) as url:
        yield url


def test_x_request_id_round_trip(base: str) -> None:
    c = client(base)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=2,
                                                      extra_headers={"X-Request-Id": "trace-42.a"})
    assert raw.headers["x-request-id"] == "trace-42.a" and raw.parse().id == "chatcmpl-trace-42.a"
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
    made = raw.headers["x-request-id"]
    assert len(made) == 32 and raw.parse().id == f"cmpl-{made}"
    with c.chat.completions.with_streaming_response.create(model=MODEL, messages=ASK, max_tokens=2, stream=True,
                                                           extra_headers={"X-Request-Id": "s-1"}) as r:
        assert r.headers["x-request-id"] == "s-1"
        assert all(chunk.id == "chatcmpl-s-1" for chunk in r.parse())
    # errors carry it too; an unusable id (a space) is replaced
    r = httpx.post(base + "/v1/chat/completions", json={"messages": []}, headers={"X-Request-Id": "bad id"})
    assert r.status_code == 400 and len(r.headers["x-request-id"]) == 32


def test_stream_headers_come_when_the_request_is_queued(base: str) -> None:
    """One sequence at a time: while a long request runs, a second stream gets 200 and its role
    chunk although it cannot have a token yet."""
    done = threading.Event()

    def blocker() -> None:
        with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
                "prompt": "x", "max_tokens": 1000, "stream": True, "ignore_eos": True}) as r:
            for _line in r.iter_lines():
                if done.is_set():
                    break

    t = threading.Thread(target=blocker)
    t.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=60, json={
                "messages": ASK, "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            waited = time.monotonic() - start
            assert t.is_alive(), "the blocker still runs: no token can exist for this stream"
            assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert waited < 5
        start = time.monotonic()
        with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
                "prompt": "y", "max_tokens": 3, "stream": True}) as r:  # no opening chunk: the headers alone
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert t.is_alive() and time.monotonic() - start < 5
    finally:
        done.set()
        t.join(60)


def test_n_that_can_never_fit_the_queue_is_400_not_503(base: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(base).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, n=5)
    assert e.value.body["param"] == "n" and "never fit" in e.value.body["message"]
    r = client(base).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, n=4)
    assert len(r.choices) == 4
