"""`kill -9` during traffic, then a restart with the same `--session-dir` (real `mcserve serve`, the
tiny random model, CPU): every session saved before the kill (one on request, the others by the periodic
saver) resumes from its saved checkpoints and gives the greedy tokens the same prompt gets cold; a
corrupted session file is refused with a clear error while the server keeps serving. (The exact
resume from the end-of-turn snapshot is tested in-process: tests/server/engine/test_sessions.py.)"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from mcserve.server.engine.sessions.book import owner_of
from mcserve.server.engine.sessions.store import file_name
from mcserve.server.model.init_model import init_model
from tests.live_server import live_mcserve

pytestmark = pytest.mark.slow
KEY = "restart-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEGMENT = 16
SESSIONS = ("asked", "periodic", "bad")


def _complete(url: str, prompt: list[int], session_id: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "session_id": session_id}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)


def _text(url: str, prompt: list[int], session_id: str) -> tuple[str, int]:
    r = _complete(url, prompt, session_id)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def _traffic(url: str, stop: threading.Event) -> None:
    """A stream in flight when the kill comes."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    except httpx.HTTPError:
        return


def test_sessions_survive_kill_9(tmp_path: Path) -> None:
    sessions, model = tmp_path / "sessions", tmp_path / "tiny"
    init_model(model, preset="tiny", mc={"aggregation": "ssc", "segment_size": SEGMENT, "top_k": 2}, seed=0)
    args = (str(model), "--api-key", KEY, "--session-dir", str(sessions), "--session-save-interval", "0.5",
            "--max-model-len", "512")
    rng = random.Random(0)
    turn1 = {s: [rng.randrange(3, 500) for _ in range(rng.randrange(40, 90))] for s in SESSIONS}
    turn2 = {s: p + [7, 8, 9] for s, p in turn1.items()}
    with live_mcserve(tmp_path, *args) as server:
        want = {}
        for sid in SESSIONS:
            _text(server.url, turn1[sid], sid)
            want[sid] = _text(server.url, turn2[sid], f"cold-{sid}")  # another namespace: computed cold
            assert want[sid][1] == 0
        saved = httpx.post(server.url + "/v1/sessions/asked/save", headers=AUTH, timeout=60)
        assert saved.status_code == 200, saved.text
        files = {s: sessions / file_name(owner_of(KEY), s) for s in SESSIONS}
        deadline = time.monotonic() + 30
        while not all(f.exists() for f in files.values()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the periodic saver writes the others
        stop = threading.Event()
        stream = threading.Thread(target=_traffic, args=(server.url, stop), daemon=True)
        stream.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
    assert all(f.exists() for f in files.values()), sorted(p.name for p in sessions.iterdir())

    data = bytearray(files["bad"].read_bytes())
    data[len(data) // 2] ^= 0x10
    files["bad"].write_bytes(bytes(data))
    with live_mcserve(tmp_path, *args) as server:
        listing = httpx.get(server.url + "/v1/sessions", headers=AUTH, timeout=30).json()["data"]
        assert {s["id"] for s in listing} >= set(SESSIONS)
        for sid in ("asked", "periodic"):
            text, cached = _text(server.url, turn2[sid], sid)
            assert cached == (len(turn2[sid]) - 1) // SEGMENT * SEGMENT > 0, sid
            assert text == want[sid][0], sid
        r = _complete(server.url, turn2["bad"], "bad")
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_file_invalid", r.text
        assert "checksum" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert _text(server.url, turn2["bad"], "fresh")[0] == want["bad"][0]  # the server serves on
