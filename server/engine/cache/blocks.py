"""A pool of checkpoint block ids (the GPU pool or the host offload pool): which are free and which
Checkpoint occupies each used one. The tensors themselves are the runner's."""

from __future__ import annotations

from collections.abc import Iterator

from mcserve.server.engine.cache.checkpoint import Checkpoint


class BlockPool:
    """Block ids 0..num_blocks-1. Free ids are handed out last-freed first (block 0 first at start).

    A block given back with `later=True` (the source of a copy planned this step) becomes free only
    at the next `begin_step`, so that no later stage of this step writes it before the copy reads it.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._later: list[int] = []
        self._owner: dict[int, Checkpoint] = {}

    def __len__(self) -> int:
        """Blocks occupied by a checkpoint."""
        return len(self._owner)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self._owner.values())

    @property
    def num_free(self) -> int:
        return len(self._free)

    def owner(self, block: int) -> Checkpoint | None:
        return self._owner.get(block)

    def begin_step(self) -> None:
        self._free.extend(self._later)
        self._later.clear()

    def take(self, c: Checkpoint) -> int | None:
        """A free block for `c`, or None when none is free."""
        if not self._free:
            return None
        block = self._free.pop()
        self._owner[block] = c
        return block

    def give_back(self, block: int, later: bool = False) -> None:
        del self._owner[block]
        (self._later if later else self._free).append(block)

    def check(self, where: str) -> None:
        """Invariants (tests): every block is exactly one of free, pending or occupied."""
        free = self._free + self._later
        assert len(free) + len(self._owner) == self.num_blocks, f"{where} block leaked"
        assert set(free).isdisjoint(self._owner) and len(set(free)) == len(free), f"{where} block double-owned"
