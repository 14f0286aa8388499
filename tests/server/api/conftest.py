from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.api.fake_server import API_KEY

REPO_ROOT = Path(__file__).parents[3]


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    api_key: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def fake_request(self, request_id: str) -> dict:
        r = httpx.get(f"{self.base_url}/_fake/request/{request_id}", headers=self.auth, timeout=5)
        r.raise_for_status()
        return r.json()

    def health(self) -> int:
        return httpx.get(self.base_url + "/health", timeout=5).status_code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_metrics(base_url: str, model_name: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels other than model_name): value} of every mcserve: sample on /metrics
    (each carries the model name; the process_* ones do not)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=5).text):
        if not family.name.startswith("mcserve:"):
            continue
        for s in family.samples:
            assert s.labels.get("model_name") == model_name, s
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


@contextmanager
def fake_server(log_dir: Path, *extra_args: str) -> Iterator[LiveServer]:
    """The real app (FakeEngine + TinyTokenizer) under uvicorn in a subprocess on 127.0.0.1, until
    /health answers 200; stopped on exit. `extra_args` go to tests/server/api/fake_server.py."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.server.api.fake_server", "--port", str(port), *extra_args],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", API_KEY, log_path)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if server.health() == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test server did not start:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with fake_server(tmp_path_factory.mktemp("server")) as server:
        yield server
