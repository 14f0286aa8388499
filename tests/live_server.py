"""Starting a real `mcserve serve` (the embedded default model, CPU) on loopback for the tests that need
the real process: signals, Prometheus scraping it, nginx in front of two of them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 300.0  # loading takes ~8 s on an idle 2-core box, minutes on a busy one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mcserve_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "mcserve.server.cli", "serve", "--port", str(port), "--device", "cpu", *args]


def start_mcserve(log_dir: Path, *args: str) -> LiveServer:
    port = free_port()
    log = log_dir / f"mcserve-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(mcserve_command(port, *args), stdout=out, stderr=subprocess.STDOUT, env=env)
    return LiveServer(proc, port, log)


def wait_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.proc.poll() is None, f"mcserve exited with {server.proc.returncode}:\n{server.log_text()}"
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"mcserve not ready in {START_TIMEOUT_S} s:\n{server.log_text()}"
        time.sleep(0.2)


@contextmanager
def live_mcserves(log_dir: Path, n: int, *args: str) -> Iterator[list[LiveServer]]:
    """`n` x `mcserve serve --port P --device cpu ARGS`, loading side by side, until each /health
    answers 200; SIGKILLed on exit if still running (a test that stops one checks its exit status)."""
    servers: list[LiveServer] = []
    try:
        for _ in range(n):
            servers.append(start_mcserve(log_dir, *args))
        for server in servers:
            wait_ready(server)
        yield servers
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(10)


@contextmanager
def live_mcserve(log_dir: Path, *args: str) -> Iterator[LiveServer]:
    with live_mcserves(log_dir, 1, *args) as (server,):
        yield server
