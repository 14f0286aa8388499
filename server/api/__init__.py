"""The OpenAI-compatible HTTP front end: `build_app(engine, tokenizer, settings)`."""

from __future__ import annotations

from mcserve.server.api.app import build_app

__all__ = ["build_app"]
