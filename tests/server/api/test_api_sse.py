"""The SSE bytes on the wire, read with raw httpx."""

from __future__ import annotations

import json

import httpx

from tests.server.api.conftest import LiveServer


def _events(
    live: LiveServer, path: str, body: dict, comments: list[str] | None = None
) -> tuple[httpx.Response, list[str]]:
    """`data:` payloads in order (comment lines go to `comments`). Fails on any other line."""
    with httpx.stream("POST", live.v1 + path, json=body, headers=live.auth, timeout=10) as r:
        raw = r.read().decode()
    assert raw.endswith("\n\n"), raw[-50:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if comments is not None:
            comments.extend(ln for ln in block.split("\n") if ln.startswith(":"))
        assert len(lines) <= 1 and all(ln.startswith("data: ") for ln in lines), block
        events.extend(ln[len("data: ") :] for ln in lines)
    return r, events


def test_slow_streams_carry_keepalive_comments(live_server: LiveServer) -> None:
    comments: list[str] = []
    _, events = _events(live_server, "/completions", {"prompt": "[[slow]]", "max_tokens": 5, "stream": True}, comments)
    assert comments and all(c.startswith(": ping") for c in comments)
    assert events[-1] == "[DONE]" and len(events) == 6


def test_chat_stream_wire_format(live_server: LiveServer) -> None:
    r, events = _events(
        live_server,
        "/chat/completions",
        {
            "messages": [{"role": "user", "content": "wire"}],
            "max_tokens": 3,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 6
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] == usage["usage"]["prompt_tokens"] // 2
    per_choice: dict[int, list[dict]] = {0: [], 1: []}
    for c in chunks[:-1]:
        assert len(c["choices"]) == 1 and c["usage"] is None
        per_choice[c["choices"][0]["index"]].append(c["choices"][0])
    for seq in per_choice.values():
        assert seq[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in seq[1:])
        assert [ch["finish_reason"] for ch in seq] == [None] * (len(seq) - 1) + ["length"]
        assert "".join(ch["delta"].get("content", "") for ch in seq) != ""
    indices = [c["choices"][0]["index"] for c in chunks[:-1]]
    assert indices[:4] == [0, 1, 0, 1], "choices interleave as the engine produces them"


def test_completion_stream_without_usage(live_server: LiveServer) -> None:
    _, events = _events(live_server, "/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["choices"] and c.get("usage") is None for c in chunks)
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]


def test_error_mid_stream_is_an_error_event_then_done(live_server: LiveServer) -> None:
    for marker, error_type in (("[[error]]", "internal_server_error"), ("[[raise]]", "internal_server_error")):
        r, events = _events(
            live_server,
            "/chat/completions",
            {"messages": [{"role": "user", "content": marker}], "max_tokens": 10, "stream": True},
        )
        assert r.status_code == 200
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == error_type and set(error) == {"message", "type", "param", "code"}
        assert all("error" not in json.loads(e) for e in events[:-2])
        assert live_server.health() == 200


def test_errors_before_the_first_token_are_http_statuses_even_when_streaming(live_server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "[[invalid]]"}], "max_tokens": 3, "stream": True}
    r = httpx.post(live_server.v1 + "/chat/completions", json=body, headers=live_server.auth, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    body["messages"][0]["content"] = "[[crash]]"
    r = httpx.post(live_server.v1 + "/chat/completions", json=body, headers=live_server.auth, timeout=5)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert live_server.health() == 200
