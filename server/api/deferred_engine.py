"""An `EngineClient` that stands in while the real engine loads, so the HTTP server can listen (and
answer /health with 503) from the first second of start-up."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mcserve.server.api.errors import EngineNotReadyError
from mcserve.server.engine.client import EngineClient, EngineHealth, EngineStats, GenerateRequest
from mcserve.server.engine.outputs import Delta


class DeferredEngine:
    """Not ready until `attach(engine)`; from then on everything goes to `engine`."""

    def __init__(self, model_name: str, max_model_len: int = 0) -> None:
        self._name = model_name
        self._max_model_len = max_model_len
        self.inner: EngineClient | None = None

    def attach(self, engine: EngineClient) -> None:
        assert self.inner is None, "engine attached twice"
        self.inner = engine

    @property
    def model_name(self) -> str:
        return self.inner.model_name if self.inner is not None else self._name

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len if self.inner is not None else self._max_model_len

    @property
    def max_waiting(self) -> int:
        return self._ready().max_waiting

    @property
    def max_num_seqs(self) -> int:
        return self._ready().max_num_seqs

    @property
    def is_ready(self) -> bool:
        return self.inner is not None and self.inner.is_ready

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self.inner is None:
            raise EngineNotReadyError()
        return self.inner.generate(request)

    async def abort(self, request_id: str) -> None:
        if self.inner is not None:
            await self.inner.abort(request_id)

    async def save_session(self, api_key: str | None, session_id: str) -> dict:
        return await self._ready().save_session(api_key, session_id)

    async def delete_session(self, api_key: str | None, session_id: str) -> None:
        await self._ready().delete_session(api_key, session_id)

    async def list_sessions(self, api_key: str | None) -> list[dict]:
        return await self._ready().list_sessions(api_key)

    def _ready(self) -> EngineClient:
        if self.inner is None:
            raise EngineNotReadyError()
        return self.inner

    def stats(self) -> EngineStats:
        if self.inner is None:
            return EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        return self.inner.stats()

    def health(self) -> EngineHealth:
        return EngineHealth("loading") if self.inner is None else self.inner.health()
