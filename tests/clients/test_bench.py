"""mcserve-bench's vLLM-bench-serve parity features: token lengths, datasets, shared prefixes, TPOT,
percentiles, goodput, the session header, the result file with metadata and the plot."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from pathlib import Path

import httpx
import pytest

from mcserve.clients.bench_cli import main, result_path
from mcserve.clients.bench_report import RequestRecord, summarize
from mcserve.clients.chat import ChatSession
from mcserve.clients.loadgen import run_load
from mcserve.clients.tokens import LocalTokenizer, text_of_tokens
from mcserve.clients.workload import LengthDist, LoadConfig
from mcserve.server.model.default import default_model_dir
from tests.server.api.conftest import LiveServer


def _cfg(live: LiveServer, **kw: object) -> LoadConfig:
    base = dict(url=live.base_url, api_key=live.api_key, request_timeout_s=10.0, output_len=LengthDist("fixed", 2))
    base.update(kw)
    return LoadConfig(**base)  # type: ignore[arg-type]


def test_random_text_is_cut_to_the_token_count_of_a_real_tokenizer() -> None:
    tok = LocalTokenizer(default_model_dir())
    rng = random.Random(0)
    for n in (1, 7, 64, 301):
        text = asyncio.run(text_of_tokens(tok, rng, n))
        got = len(asyncio.run(tok.encode(text)))
        assert abs(got - n) <= 1, (n, got)  # a re-merge at the cut can move one token


def test_server_tokenizer_gives_exact_prompt_lengths_and_several_prefixes(server: LiveServer) -> None:
    """The fake server tokenizes bytes: a completions prompt of P tokens is BOS + P bytes."""
    cfg = _cfg(
        server,
        endpoint="completions",
        tokenizer="server",
        prompt_len=LengthDist("fixed", 40),
        max_requests=6,
        concurrency=2,
        shared_prefix_len=10,
        num_prefixes=3,
        seed=11,
    )
    result = asyncio.run(run_load(cfg))
    assert result.tokenizer == "server" and result.server_version
    assert [r.status for r in result.records] == ["200"] * 6
    # prefix (10) + " " + text (40) + BOS
    assert {r.prompt_tokens for r in result.records} == {52}


def _capture_transport(bodies: list[tuple[dict, dict]]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path in ("/version", "/tokenize"):
            return httpx.Response(404)
        bodies.append((json.loads(request.content), dict(request.headers)))
        chunks = [{"choices": [{"delta": {"content": w}}]} for w in ("a", "b", "c")]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_sharegpt_conversations_send_their_turns_with_reply_lengths_and_the_session_header(tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hello there"},
                {"from": "gpt", "value": "one two three four"},
                {"from": "human", "value": "and then"},
                {"from": "gpt", "value": "five six"},
            ]
        },
        {"messages": [{"role": "user", "content": "only one"}, {"role": "assistant", "content": "x y z"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    bodies: list[tuple[dict, dict]] = []
    cfg = LoadConfig(url="http://bench.invalid", dataset=str(path), max_requests=3, concurrency=1, session_ids=True)
    result = asyncio.run(run_load(cfg, transport=_capture_transport(bodies)))
    assert result.tokenizer == "words" and result.server_version is None  # a plain OpenAI server
    assert [b["max_tokens"] for b, _ in bodies] == [4, 2, 3]  # the recorded replies, in words
    first, second, third = (b for b, _ in bodies)
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert second["messages"][-1] == {"role": "user", "content": "and then"} and len(second["messages"]) == 4
    assert third["messages"] == [{"role": "user", "content": "only one"}]
    for body, headers in bodies:
        assert headers["x-session-id"] == body["session_id"]
    assert bodies[0][0]["session_id"] == bodies[1][0]["session_id"] != bodies[2][0]["session_id"]


def test_jsonl_prompts_with_output_lengths(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b c", "output_len": 7}\n{"prompt": "d"}\n')
    bodies: list[tuple[dict, dict]] = []
    cfg = LoadConfig(
        url="http://bench.invalid",
        dataset=str(path),
        max_requests=4,
        concurrency=1,
        endpoint="completions",
        output_len=LengthDist("fixed", 5),
    )
    asyncio.run(run_load(cfg, transport=_capture_transport(bodies)))
    assert [(b["prompt"], b["max_tokens"]) for b, _ in bodies] == [("a b c", 7), ("d", 5), ("a b c", 7), ("d", 5)]


def test_tpot_percentiles_and_goodput() -> None:
    fast = RequestRecord(0, 0, 0.0, "200", e2e_s=1.1, ttft_s=0.1, completion_tokens=11)  # TPOT 100 ms
    slow = RequestRecord(1, 0, 0.0, "200", e2e_s=3.0, ttft_s=1.0, completion_tokens=5)  # TPOT 500 ms
    failed = RequestRecord(2, 0, 0.0, "503", e2e_s=0.01)
    assert fast.tpot_s == pytest.approx(0.1) and slow.tpot_s == pytest.approx(0.5) and failed.tpot_s is None
    s = summarize([fast, slow, failed], wall_s=2.0, quantiles=(50, 99.9), slos_ms={"ttft": 200, "tpot": 150})
    assert set(s["tpot_s"]) == {"p50", "p99.9", "mean", "count"}
    assert s["tpot_s"]["p50"] == pytest.approx(0.3) and s["tpot_s"]["count"] == 2
    assert s["goodput"] == {"slos_ms": {"ttft": 200, "tpot": 150}, "requests": 1, "requests_per_s": 0.5}
    assert summarize([fast, slow], 2.0, slos_ms={"e2e": 5000})["goodput"]["requests"] == 2


def test_result_files_are_never_overwritten(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    a = result_path(str(tmp_path / "r"), "my model", now)
    a.write_text("{}")
    b = result_path(str(tmp_path / "r"), "my model", now)
    assert a.name == "20260102T030405Z-my_model.json" and b.name == "20260102T030405Z-my_model-2.json"


def test_cli_writes_a_result_with_metadata_and_a_plot(server: LiveServer, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    argv = [
        "--url",
        server.base_url,
        "--api-key",
        server.api_key,
        "-c",
        "2",
        "-n",
        "4",
        "--turns",
        "2",
        "--session",
        "--prompt-len",
        "8",
        "--output-len",
        "3",
        "--percentiles",
        "50,95",
        "--goodput",
        "ttft:60000",
        "--result-dir",
        str(tmp_path),
        "--label",
        "t",
        "--plot",
        "--no-progress",
    ]
    assert main(argv) == 0
    (result,) = tmp_path.glob("*-t.json")
    data = json.loads(result.read_text())
    meta = data["metadata"]
    assert meta["server"]["version"] and meta["argv"] == argv and meta["tokenizer"] == "server"
    assert meta["started_at"] <= meta["finished_at"]
    assert data["summary"]["goodput"]["requests"] == 4 and "p95" in data["summary"]["ttft_s"]
    assert result.with_suffix(".png").stat().st_size > 1000
    assert main(argv) == 0 and len(list(tmp_path.glob("*-t*.json"))) == 2  # a second run, a second file


def test_chat_sends_the_session_as_header_and_body() -> None:
    session = ChatSession(client=None, model="m", session_id="me")
    assert session.options["extra_headers"] == {"X-Session-Id": "me"}
    assert session.options["extra_body"] == {"session_id": "me"}
