"""The load generator against the live fake server (and a mock transport for statuses it never sends)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from mcserve.clients.bench_cli import main
from mcserve.clients.bench_report import RequestRecord, markdown, percentile, summarize
from mcserve.clients.loadgen import run_load
from mcserve.clients.workload import LengthDist, LoadConfig
from tests.server.api.conftest import LiveServer


def _cfg(live: LiveServer, **kw: object) -> LoadConfig:
    base = dict(url=live.base_url, api_key=live.api_key, prompt_len=LengthDist("fixed", 4), request_timeout_s=10.0)
    base.update(kw)
    return LoadConfig(**base)  # type: ignore[arg-type]


def test_8_clients_x_3_requests_all_succeed_with_exact_counts(server: LiveServer) -> None:
    # [[paced]]: 10 ms per token, so the 8 clients overlap at the server.
    cfg = _cfg(server, concurrency=8, max_requests=24, output_len=LengthDist("fixed", 6), prefix_text="[[paced]]")
    result = asyncio.run(run_load(cfg))
    s = result.summary()
    assert result.model == "fake-model"
    assert (s["requests"], s["ok"], s["errors"]) == (24, 24, {})
    assert sorted(r.conversation for r in result.records) == list(range(24))
    for r in result.records:
        assert (r.status, r.completion_tokens, r.chunks, len(r.itl_s)) == ("200", 6, 6, 5)
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s
        assert r.prompt_tokens is not None and r.cached_tokens == r.prompt_tokens // 2  # what FakeEngine reports
    assert s["completion_tokens"] == 24 * 6
    assert s["cached_tokens"] == sum(r.prompt_tokens // 2 for r in result.records)
    assert s["ttft_s"]["count"] == 24 and s["itl_s"]["count"] == 24 * 5
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"]
    assert s["output_tokens_per_s"] == pytest.approx(24 * 6 / result.wall_s)
    peak = server.fake_request("any")["peak_inflight"]
    assert 2 <= peak <= 8, peak


def test_multi_turn_resends_the_history_under_one_session_per_conversation(server: LiveServer) -> None:
    cfg = _cfg(
        server, concurrency=8, max_requests=24, turns=3, session_ids=True, output_len=LengthDist("fixed", 3), seed=7
    )
    result = asyncio.run(run_load(cfg))
    assert result.summary()["ok"] == 24
    by_conv: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in result.records:
        by_conv[r.conversation].append(r)
    assert sorted(by_conv) == list(range(8))
    for conv, rs in by_conv.items():
        rs.sort(key=lambda r: r.turn)
        assert [r.turn for r in rs] == [0, 1, 2]
        lens = [r.prompt_tokens for r in rs]
        assert lens[0] < lens[1] < lens[2], lens  # each turn carries the previous ones
        seen = server.fake_request(f"loadgen-7-{conv}")["seen"]
        assert seen["session_id"] == f"loadgen-7-{conv}" and seen["prompt_len"] == lens[2]
        assert seen["params"]["ignore_eos"] is True and seen["params"]["max_tokens"] == 3
    assert [t["turn"] for t in result.summary()["per_turn"]] == [0, 1, 2]


def test_a_full_queue_503_is_counted_by_status(tight_server: LiveServer) -> None:
    cfg = _cfg(tight_server, concurrency=8, max_requests=16, output_len=LengthDist("fixed", 5), prefix_text="[[paced]]")
    result = asyncio.run(run_load(cfg))
    s = result.summary()
    assert s["requests"] == 16 and set(s["errors"]) == {"503"}
    assert s["errors"]["503"] >= 1 and s["ok"] >= 2 and s["ok"] + s["errors"]["503"] == 16
    failed = [r for r in result.records if not r.ok]
    assert all("requests in flight" in (r.error or "") and r.ttft_s is None for r in failed)
    assert "503: " in markdown(s)


def _mock_server() -> httpx.MockTransport:
    """Request i (in arrival order) gets 429, a 2-token stream, or 503, for i % 3 = 0, 1, 2."""
    count = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal count
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path in ("/version", "/tokenize"):  # a plain OpenAI server has neither
            return httpx.Response(404, json={"error": {"message": "not found"}})
        assert request.url.path == "/v1/chat/completions" and request.url.host == "bench.invalid"
        count += 1
        if count % 3 == 1:
            return httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "1"})
        if count % 3 == 0:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        chunks = [{"choices": [{"delta": {"content": c}}]} for c in "ab"]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
        body = ": ping\n\n" + "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_429_and_503_are_errors_by_status() -> None:
    cfg = LoadConfig(url="http://bench.invalid/v1", concurrency=3, max_requests=9)
    result = asyncio.run(run_load(cfg, transport=_mock_server()))
    s = result.summary()
    assert (s["ok"], s["errors"]) == (3, {"429": 3, "503": 3})
    assert {r.error for r in result.records if r.status == "429"} == {"slow down"}
    ok = [r for r in result.records if r.ok]
    assert all((r.chunks, r.completion_tokens, r.prompt_tokens, r.cached_tokens) == (2, 2, 7, None) for r in ok)
    assert s["cached_tokens"] is None and s["cached_fraction"] is None


def test_stream_errors_server_errors_and_timeouts_are_counted(server: LiveServer) -> None:
    cases = {"[[error]]": "stream_error", "[[crash]]": "500", "[[invalid]]": "400"}
    for marker, status in cases.items():
        s = asyncio.run(run_load(_cfg(server, concurrency=2, max_requests=3, prefix_text=marker))).summary()
        assert (s["ok"], s["errors"]) == (0, {status: 3}), marker
    # [[slow]]: 50 ms per token, so 100 tokens cannot finish within 0.3 s.
    cfg = _cfg(
        server,
        concurrency=2,
        max_requests=2,
        prefix_text="[[slow]]",
        request_timeout_s=0.3,
        output_len=LengthDist("fixed", 100),
    )
    result = asyncio.run(run_load(cfg))
    assert result.summary()["errors"] == {"timeout": 2}
    assert all(r.e2e_s < 1.0 and r.chunks >= 1 for r in result.records)


def test_duration_bounds_a_poisson_run(server: LiveServer) -> None:
    cfg = _cfg(
        server, concurrency=4, max_requests=1_000_000, duration_s=0.5, rate=40.0, output_len=LengthDist("fixed", 2)
    )
    start = time.perf_counter()
    result = asyncio.run(run_load(cfg))
    assert time.perf_counter() - start < 3.0
    starts = [r.start_s for r in result.records]
    assert 5 <= len(starts) <= 60 and max(starts) < 0.55  # ~20 expected; none starts after the duration
    assert result.summary()["errors"] == {}


def test_cli_writes_json_without_nan_and_prints_the_table(server: LiveServer, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = f"--url {server.base_url} --api-key {server.api_key} -c 2 -n 4 --prompt-len 3:6 --output-len 2".split()
    argv += ["--prefix-text", "[[crash]]", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 4 | 0 | 500: 4 |" in printed and "| TTFT | - | - | - | - | 0 |" in printed

    def no_nan(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    data = json.loads(out.read_text(), parse_constant=no_nan)
    assert data["summary"]["errors"] == {"500": 4} and data["summary"]["ttft_s"]["p50"] is None
    assert data["config"]["api_key"] == "***" and len(data["requests"]) == 4


def test_cli_reports_an_unreachable_model_list(server: LiveServer, capsys) -> None:
    assert main(["--url", server.base_url, "--api-key", "wrong", "-n", "1", "-o", ""]) == 2
    assert "401 invalid or missing API key" in capsys.readouterr().err


def test_length_distributions_parse_and_stay_in_range() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128") == LengthDist("fixed", 128.0)
    assert LengthDist.parse("64:256") == LengthDist("uniform", 64.0, 256.0)
    assert LengthDist.parse("normal:100:30").kind == "normal"
    assert {LengthDist.parse("3:5").sample(rng) for _ in range(200)} == {3, 4, 5}
    assert all(1 <= LengthDist.parse("exp:4", cap=9).sample(rng) <= 9 for _ in range(200))
    for bad in ("", "x", "5:2", "exp:1:2", "normal:0:1", "beta:1:2"):
        with pytest.raises(ValueError, match="length"):
            LengthDist.parse(bad)


def test_config_rejects_unbounded_or_inconsistent_runs() -> None:
    with pytest.raises(ValueError, match="max_requests"):
        LoadConfig(max_requests=0)
    with pytest.raises(ValueError, match="duration_s"):
        LoadConfig(duration_s=float("inf"))
    with pytest.raises(ValueError, match="turns > 1 needs the chat endpoint"):
        LoadConfig(endpoint="completions", turns=2)
    with pytest.raises(ValueError, match="url"):
        LoadConfig(url="127.0.0.1:8000")
    assert LoadConfig(url="http://h:1/v1/").base_url == "http://h:1"


def test_percentiles_interpolate_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert (percentile(xs, 50), percentile(xs, 90), percentile(xs, 0), percentile(xs, 100)) == (3.0, 4.6, 1.0, 5.0)
    s = summarize([RequestRecord(0, 0, 0.0, "200", 1.0, ttft_s=0.5, completion_tokens=10)], wall_s=2.0)
    assert (s["request_throughput"], s["output_tokens_per_s"], s["ttft_s"]["p99"]) == (0.5, 5.0, 0.5)
