"""SIGTERM on a real `mcserve serve` (default model, CPU): /health turns 503 "draining" at once, new
requests get 503 + Retry-After, the in-flight stream finishes with [DONE] (or, past --drain-timeout,
ends with an error event and [DONE]), and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import live_mcserve

pytestmark = pytest.mark.slow


class StreamReader(threading.Thread):
    """Reads one streaming completion; `first` is set at its first event."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.first = threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        self.first.set()
        except BaseException as e:  # reported by the test
            self.error = e
            self.first.set()

    def texts(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def _sigterm_during_a_stream(tmp_path: Path, drain_timeout: float, max_tokens: int) -> tuple[StreamReader, int, str]:
    with live_mcserve(tmp_path, "--drain-timeout", str(drain_timeout)) as server:
        reader = StreamReader(server.url, max_tokens)
        reader.start()
        assert reader.first.wait(60) and reader.error is None, reader.error
        server.proc.send_signal(signal.SIGTERM)
        health = None
        for _ in range(50):  # the signal is handled within a loop iteration
            health = httpx.get(server.url + "/health", timeout=5)
            if health.status_code == 503:
                break
            time.sleep(0.02)
        assert health is not None and (health.status_code, health.json()["status"]) == (503, "draining")
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"]["code"] == "server_draining"
        reader.join(60)
        assert not reader.is_alive() and reader.error is None, reader.error
        status = server.proc.wait(30)
        return reader, status, server.log_text()


def test_sigterm_lets_the_stream_finish_then_exits_0(tmp_path: Path) -> None:
    reader, status, log = _sigterm_during_a_stream(tmp_path, drain_timeout=60, max_tokens=48)
    assert status == 0, log
    assert reader.events[-1] == "[DONE]"
    chunks = reader.texts()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks for ch in c["choices"] if ch["text"]) >= 40  # the whole answer came
    assert "draining" in log and "drained" in log


def test_sigterm_past_the_drain_timeout_ends_the_stream_with_an_error_event_and_done(tmp_path: Path) -> None:
    started = time.monotonic()
    # 5 s: time for the checks of /health and a late request before the cut, even on a busy machine
    reader, status, log = _sigterm_during_a_stream(tmp_path, drain_timeout=5, max_tokens=8000)
    assert status == 0, log
    assert reader.events[-1] == "[DONE]"
    error = json.loads(reader.events[-2])["error"]
    assert error["code"] == "server_draining" and "drain timeout" in error["message"]
    assert time.monotonic() - started < 90
    assert "drain timeout (5 s) passed: ending 1 request(s)" in log
