"""The CLI chat against the live fake server: scripted stdin, streamed answers, errors, Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import httpx

from mcserve.clients.chat import TurnStats, main
from tests.server.api.conftest import REPO_ROOT, LiveServer


def _prompt_ids(live: LiveServer, messages: list[dict]) -> list[int]:
    r = httpx.post(live.base_url + "/tokenize", json={"messages": messages}, headers=live.auth, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _letters(prompt_ids: list[int], count: int) -> str:
    """What FakeEngine answers to these prompt ids (see tests/server/api/fake_engine.py)."""
    start = sum(prompt_ids) % 26
    return "".join(chr(ord("a") + (start + step) % 26) for step in range(count))


def _chat(live: LiveServer, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mcserve.clients.chat", "--url", live.base_url, "--api-key", live.api_key, *extra]


def test_two_turns_from_stdin_stream_answers_that_carry_the_history(server: LiveServer) -> None:
    proc = subprocess.run(
        _chat(server, "--max-tokens", "5", "--temperature", "0", "--session-id", "chat-two-turns"),
        input="hello\nsecond question\n/exit\nnever sent\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    turn1 = [{"role": "user", "content": "hello"}]
    answer1 = _letters(_prompt_ids(server, turn1), 5)
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "second question"}]
    answer2 = _letters(_prompt_ids(server, turn2), 5)
    assert answer1 != answer2
    out = proc.stdout
    assert f"assistant> {answer1}\n[TTFT " in out and f"assistant> {answer2}\n[TTFT " in out
    assert out.count("tokens/s | 5 tokens in") == 2
    seen = server.fake_request("chat-two-turns")["seen"]
    assert seen["session_id"] == "chat-two-turns" and seen["prompt_len"] == len(_prompt_ids(server, turn2))
    assert seen["params"]["max_tokens"] == 5 and seen["params"]["temperature"] == 0.0


def test_server_errors_are_printed_and_failed_turns_leave_the_history(server: LiveServer) -> None:
    session = "chat-errors"
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    answer = _letters(_prompt_ids(server, first), 4)
    checks = {
        # Before "/reset": the last request was "again" after "hello" and its answer; the failed turns are gone.
        "/reset": [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "again"}],
        "/exit": [first[0], {"role": "user", "content": "fresh"}],
    }
    script = iter(["hello", "[[invalid]]", "[[error]] boom", "", "/help", "again", "/reset", "fresh", "/exit"])

    def read_line(prompt: str) -> str:
        assert prompt == "you> "
        line = next(script)
        if line in checks:
            assert server.fake_request(session)["seen"]["prompt_len"] == len(_prompt_ids(server, checks[line]))
        return line

    out = io.StringIO()
    argv = [
        "--url",
        server.base_url + "/v1",
        "--api-key",
        server.api_key,
        "--max-tokens",
        "4",
        "--system",
        "be brief",
        "--session-id",
        session,
    ]
    assert main(argv, read_line=read_line, out=out) == 0
    text = out.getvalue()
    assert f"assistant> {answer}\n[TTFT" in text
    assert "error 400: the fake engine refuses this prompt" in text
    assert "error generation failed: fake failure" in text
    assert "commands: /reset" in text and "(new conversation)" in text
    assert next(script, None) is None


def test_a_bad_key_fails_at_start_with_the_server_message(server: LiveServer, capsys) -> None:
    out = io.StringIO()
    assert main(["--url", server.base_url, "--api-key", "wrong"], read_line=input, out=out) == 1
    assert "401: invalid or missing API key" in capsys.readouterr().err


def _read_until(proc: subprocess.Popen, buf: bytearray, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done(bytes(buf)):
        assert time.monotonic() < deadline, bytes(buf)
        try:
            buf += os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
        except BlockingIOError:
            time.sleep(0.01)


def test_ctrl_c_aborts_the_answer_and_keeps_the_conversation(server: LiveServer) -> None:
    session = "chat-ctrl-c"
    proc = subprocess.Popen(
        _chat(server, "--max-tokens", "200", "--session-id", session),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as from a terminal: a suite started in the background (`cmd &` without job control) has
        # SIGINT ignored, a child inherits that, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
    buf = bytearray()
    try:
        # [[slow]]: one token per 50 ms, so 200 tokens take 10 s; interrupt after 3 letters.
        proc.stdin.write(b"[[slow]] tell me\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        _read_until(proc, buf, lambda b: b"assistant> " in b and len(b.split(b"assistant> ")[1]) >= 3)
        first_id = server.fake_request(session)["request_id"]
        proc.send_signal(signal.SIGINT)
        _read_until(proc, buf, lambda b: b"interrupted\n" in b)
        deadline = time.monotonic() + 5
        while server.fake_request(session)["aborted_ago_s"] is None:  # the server saw the disconnect
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not server.fake_request(session)["completed"]
        proc.stdin.write(b"more\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while (second := server.fake_request(session))["request_id"] == first_id:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _read_until(proc, buf, lambda b: b.count(b"interrupted\n") == 2)
        proc.stdin.write(b"/exit\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    os.set_blocking(proc.stdout.fileno(), True)  # type: ignore[union-attr]
    buf += proc.stdout.read()  # type: ignore[union-attr]
    text = bytes(buf).decode()
    partial = text.split("assistant> ")[1].split("\n[")[0]
    assert len(partial) >= 3 and partial.isalpha()
    history = [
        {"role": "user", "content": "[[slow]] tell me"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "more"},
    ]
    assert second["seen"]["prompt_len"] == len(_prompt_ids(server, history))


def test_turn_stats_rate_counts_tokens_after_the_first() -> None:
    stats = TurnStats(elapsed_s=1.2, ttft_s=0.2, last_s=1.0, completion_tokens=9, prompt_tokens=30, cached_tokens=12)
    assert stats.tokens_per_s == 10.0
    assert stats.describe() == "[TTFT 0.200 s | 10.0 tokens/s | 9 tokens in 1.20 s | prompt 30, 12 cached]"
    assert TurnStats(elapsed_s=0.1, ttft_s=0.1, last_s=0.1, completion_tokens=1).tokens_per_s is None
