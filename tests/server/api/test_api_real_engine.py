"""`mcserve serve` end to end: the CLI in a subprocess, the real engine, a tiny random model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.api.conftest import REPO_ROOT, free_port, scrape_metrics

pytest.importorskip("mcserve.server.async_engine")


@pytest.mark.slow
def test_cli_serves_a_tiny_model(tmp_path: Path) -> None:
    from mcserve.server.model.init_model import init_model

    init_model(tmp_path / "tiny", preset="tiny", mc={"aggregation": "ssc", "top_k": 2}, seed=0)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mcserve.server.cli",
                "serve",
                str(tmp_path / "tiny"),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--max-num-seqs",
                "4",
                "--api-key",
                "k",
                "--log-level",
                "warning",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        messages = [{"role": "user", "content": "Hello, tell me a story about a cat."}]  # > 1 segment (16)
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30)
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage.completion_tokens == 5
        assert usage.prompt_tokens_details.cached_tokens > 0, "the repeat reused the first's checkpoints"
        metrics = scrape_metrics(base, "tiny")
        assert metrics[("mcserve:generation_tokens_total", ())] == 10
        assert metrics[("mcserve:request_queue_time_seconds_count", ())] == 2  # recorded by the engine
        assert "OpenAI base URL" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
