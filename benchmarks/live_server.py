"""A real `mcserve serve` on loopback for the reliability scripts: start it, wait for /health, read its
memory and descriptors from /proc, read the pool gauges from /metrics, stop it.

Only 127.0.0.1 is ever addressed. The server runs at the script's own niceness (start the script with
`nice`), with the default model unless `--model` is given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "reliability-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """`mcserve serve` as a subprocess; `with LiveServer(...) as srv:` waits until /health is 200."""

    model_dir: str | None = None
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    log_path: Path | None = None  # default: /tmp/mcserve-reliability-<port>.log
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def __enter__(self) -> LiveServer:
        cmd = [sys.executable, "-m", "mcserve.server.cli", "serve", *([self.model_dir] if self.model_dir else []),
               "--port", str(self.port), "--api-key", API_KEY, "--device", "cpu", "--log-level", "warning",
               *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_path = self.log_path or Path(f"/tmp/mcserve-reliability-{self.port}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600  # a loaded 2-core box takes minutes to import and load
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def num_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def gauges(self) -> dict[str, float]:
        """Pool and queue gauges, e.g. {"state_slots{running}": 0, "num_requests_waiting": 0, ...}."""
        out: dict[str, float] = {}
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name.removeprefix("mcserve:")
                state = s.labels.get("state")
                out[name if state is None else f"{name}{{{state}}}"] = s.value
        return out

    def wait_idle(self, timeout_s: float = 120.0) -> dict[str, float]:
        """Gauges once nothing runs or waits (AssertionError after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            g = self.gauges()
            if g["num_requests_running"] == 0 and g["num_requests_waiting"] == 0:
                return g
            assert time.monotonic() < deadline, f"server not idle after {timeout_s} s: {g}"
            time.sleep(0.2)


def accounted_for(g: dict[str, float]) -> list[str]:
    """Problems with an idle server's pools: anything held by a running sequence, or counts that do not
    add up to the totals. Empty when every slot and block is free, parked or cached."""
    problems = []
    slots = {s: g[f"state_slots{{{s}}}"] for s in ("running", "parked", "free")}
    blocks = {s: g[f"checkpoint_blocks{{{s}}}"] for s in ("running", "cached", "free")}
    if slots["running"] or blocks["running"]:
        problems.append(f"held while idle: slots {slots}, blocks {blocks}")
    if min(*slots.values(), *blocks.values()) < 0:
        problems.append(f"negative counts: slots {slots}, blocks {blocks}")
    if g["state_slot_usage"] or g["checkpoint_pool_usage"]:
        problems.append(f"usage gauges not 0: {g['state_slot_usage']}, {g['checkpoint_pool_usage']}")
    return problems


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]
