"""Test entry point: the real app around `FakeEngine` + `TinyTokenizer`.

`python -m tests.server.api.fake_server --port P` (from the repo root) serves it with uvicorn on 127.0.0.1 (what the
tests start as a subprocess); `make_app()` builds it in-process. `GET /_fake/request/{id or session id}` reports
what the fake engine saw of a request (test-only route).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from fastapi import FastAPI

from mcserve.server.api import build_app
from mcserve.server.settings import ApiSettings
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.tiny_tokenizer import TinyTokenizer

API_KEY = "test-key"
MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 2 * 1024 * 1024


def make_app(**engine_kwargs: object) -> tuple[FastAPI, FakeEngine]:
    engine = FakeEngine(TinyTokenizer(), max_model_len=MAX_MODEL_LEN, **engine_kwargs)  # type: ignore[arg-type]
    # Pings every 50 ms: slow streams carry keep-alive comments that every client must skip.
    settings = ApiSettings(api_keys=(API_KEY,), max_body_bytes=MAX_BODY_BYTES, sse_ping_s=0.05)
    app = build_app(engine, engine.tokenizer, settings)

    @app.get("/_fake/request/{key}")
    async def fake_request(key: str) -> dict:
        """`key`: a request id, or the session_id the request carried."""
        by_session = [rid for rid, r in engine.seen.items() if r.session_id == key]
        request_id = by_session[-1] if by_session else key
        req = engine.seen.get(request_id)
        aborted = engine.aborted.get(request_id)
        return {
            "request_id": request_id,
            "seen": None
            if req is None
            else {
                "prompt_len": len(req.prompt_token_ids),
                "priority": req.priority,
                "session_id": req.session_id,
                "api_key": req.api_key,
                "params": {k: v for k, v in dataclasses.asdict(req.params).items() if k != "logit_bias"},
            },
            "aborted_ago_s": None if aborted is None else time.monotonic() - aborted,
            "closed_early_at": engine.closed_early.get(request_id),
            "completed": request_id in engine.completed,
            "inflight": len(engine.inflight),
            "peak_inflight": engine.peak_inflight,
        }

    return app, engine


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-inflight", type=int, default=256)
    args = parser.parse_args()
    app, _ = make_app(max_inflight=args.max_inflight)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
