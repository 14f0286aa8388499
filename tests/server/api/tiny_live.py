"""The real app and engine on the tiny random model, served by uvicorn in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import torch
import uvicorn

from mcserve.server.api import build_app
from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_model
from mcserve.server.settings import ApiSettings
from mcserve.server.text.tokenizer import Tokenizer
from tests.server.api.conftest import free_port

MODEL = "tiny"


@contextmanager
def tiny_server(model_dir: Path, **engine_config: int) -> Iterator[str]:
    """Yields the base URL; everything is stopped on exit."""
    if not (model_dir / "config.json").exists():
        init_model(model_dir, preset="tiny", mc={"aggregation": "ssc", "segment_size": 16, "top_k": 2}, seed=0)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    tokenizer = Tokenizer.from_dir(model_dir)
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, segment_size=16, num_state_slots=16,
               num_checkpoint_blocks=256, max_waiting=16)
    cfg.update(engine_config)
    engine = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(**cfg), model_name=MODEL, seed=0))
    port = free_port()
    app = build_app(engine, tokenizer, ApiSettings(port=port, served_model_name=MODEL, sse_ping_s=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "tiny server did not start"
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        engine.shutdown()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
