"""Live fake servers (tests/server/api/fake_server.py under uvicorn on 127.0.0.1) for the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.api.conftest import LiveServer, fake_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Room for 256 requests in flight. Tests here send at most 8 at once (test_loadgen checks the peak)."""
    with fake_server(tmp_path_factory.mktemp("clients-server"), "--max-inflight", "256") as s:
        yield s


@pytest.fixture(scope="session")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Room for 2 requests in flight: a third gets 503 (queue full)."""
    with fake_server(tmp_path_factory.mktemp("clients-tight"), "--max-inflight", "2") as s:
        yield s
