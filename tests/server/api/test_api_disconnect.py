"""A client that goes away aborts its engine request at once (FakeEngine's slow mode: 50 ms a token)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.api.conftest import LiveServer

SLOW = [{"role": "user", "content": "[[slow]] take your time"}]
MAX_TOKENS = 200  # 10 s of slow generation: an abort that works shows up long before


def _wait_aborted(live: LiveServer, key: str, limit_s: float = 2.0) -> tuple[float, dict]:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        state = live.fake_request(key)
        if state["aborted_ago_s"] is not None and state["closed_early_at"] is not None:
            return time.monotonic() - start - state["aborted_ago_s"], state
        time.sleep(0.01)
    pytest.fail(f"request {key} was not aborted within {limit_s}s: {live.fake_request(key)}")


def test_dropped_stream_aborts_within_a_step(live_server: LiveServer) -> None:
    body = {"messages": SLOW, "max_tokens": MAX_TOKENS, "stream": True}
    events = []
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", live_server.v1 + "/chat/completions", json=body, headers=live_server.auth) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 4:  # role + 3 tokens
                    break
        dropped = time.monotonic()
    after_drop_s, state = _wait_aborted(live_server, events[0]["id"])
    assert after_drop_s < 0.5, f"abort came {after_drop_s:.3f}s after the client left"
    assert time.monotonic() - dropped < 2.0
    assert not state["completed"] and state["closed_early_at"] < 20
    assert state["inflight"] == 0


def test_dropped_non_streaming_request_aborts(live_server: LiveServer) -> None:
    body = {"messages": SLOW, "max_tokens": MAX_TOKENS, "session_id": "dc-non-stream"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            live_server.v1 + "/chat/completions",
            json=body,
            headers=live_server.auth,
            timeout=httpx.Timeout(5.0, read=0.3),
        )
    _, state = _wait_aborted(live_server, "dc-non-stream")
    assert not state["completed"] and state["closed_early_at"] < 20


def test_openai_client_closing_a_stream_aborts(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=live_server.v1, api_key=live_server.api_key, max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="fake-model", messages=SLOW, max_tokens=MAX_TOKENS, stream=True)
    first = next(iter(stream))
    stream.close()
    _, state = _wait_aborted(live_server, first.id)
    assert not state["completed"]
