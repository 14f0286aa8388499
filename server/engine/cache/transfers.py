"""Block copies between the GPU pool and the host pool decided while planning one step, in the order
the runner must run them (offloads, then onloads; plan.py)."""

from __future__ import annotations

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.plan import BlockCopy


class TransferQueue:
    def __init__(self) -> None:
        self._offloads: list[BlockCopy] = []
        self._onloads: list[BlockCopy] = []
        self._offloaded_now: set[Checkpoint] = set()

    def begin_step(self) -> None:
        self._offloaded_now.clear()

    def offload(self, c: Checkpoint, gpu: int, host: int) -> None:
        self._offloads.append(BlockCopy(gpu, host))
        self._offloaded_now.add(c)

    def onload(self, host: int, gpu: int) -> None:
        self._onloads.append(BlockCopy(host, gpu))

    def offloaded_now(self, c: Checkpoint) -> bool:
        """`c` left the GPU in this step: it cannot come back before the copy out has run."""
        return c in self._offloaded_now

    def take(self) -> tuple[tuple[BlockCopy, ...], tuple[BlockCopy, ...]]:
        """(offloads, onloads) decided since the last call."""
        out = tuple(self._offloads), tuple(self._onloads)
        self._offloads.clear()
        self._onloads.clear()
        return out
