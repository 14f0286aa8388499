"""Live fake servers (tests/server/api/fake_server.py under uvicorn on 127.0.0.1) for the client tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.server.api.conftest import REPO_ROOT, LiveServer, free_port
from tests.server.api.fake_server import API_KEY


@contextmanager
def fake_server(log_dir: Path, max_inflight: int) -> Iterator[LiveServer]:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.server.api.fake_server",
                "--port",
                str(port),
                "--max-inflight",
                str(max_inflight),
            ],
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
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Room for 256 requests in flight. Tests here send at most 8 at once (test_loadgen checks the peak)."""
    with fake_server(tmp_path_factory.mktemp("clients-server"), max_inflight=256) as s:
        yield s


@pytest.fixture(scope="session")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Room for 2 requests in flight: a third gets 503 (queue full)."""
    with fake_server(tmp_path_factory.mktemp("clients-tight"), max_inflight=2) as s:
        yield s
