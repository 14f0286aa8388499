"""The prefix tree: indexed checkpoints by prefix hash (see prefix_index.py), each linked to the
indexed checkpoint of the previous segment of the same prefix.

Every indexed checkpoint is reachable from a root (segment 0): a checkpoint whose parent is not
indexed is not indexed either, and removing one removes its whole subtree, since no lookup could
reach the descendants without it.
"""

from __future__ import annotations

from collections.abc import Iterator

from mcserve.server.engine.cache.checkpoint import Checkpoint


class PrefixTree:
    def __init__(self) -> None:
        self._index: dict[bytes, Checkpoint] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self._index.values())

    def get(self, key: bytes) -> Checkpoint | None:
        return self._index.get(key)

    def match(self, hashes: list[bytes], limit: int) -> list[Checkpoint]:
        """Indexed checkpoints of the longest cached prefix: hashes = [h_0..h_n]; at most `limit`."""
        hits = []
        for h in hashes[1:limit + 1]:
            c = self._index.get(h)
            if c is None:
                break
            hits.append(c)
        return hits

    def insert(self, c: Checkpoint, key: bytes, parent_key: bytes) -> bool:
        """Index `c` under `key` below the checkpoint indexed under `parent_key` (none for segment 0).
        False, and nothing changes, when `key` is taken (a twin computed concurrently) or the parent
        is not indexed (the chain is broken before it, so `c` would be unreachable)."""
        assert c.key is None, c
        parent = self._index.get(parent_key) if c.segment > 0 else None
        if key in self._index or (c.segment > 0 and parent is None):
            return False
        c.key = key
        self._index[key] = c
        if parent is not None:
            c.parent = parent
            parent.children.add(c)
        return True

    def remove(self, c: Checkpoint) -> tuple[Checkpoint | None, list[Checkpoint]]:
        """Unindex `c` and its subtree. Returns (c's former parent, which may have become a leaf;
        the descendants unindexed with it, in visiting order)."""
        parent = c.parent
        if parent is not None:
            parent.children.discard(c)
            c.parent = None
        removed = []
        stack = [c]
        while stack:
            x = stack.pop()
            del self._index[x.key]
            x.key = None
            x.version += 1
            stack.extend(x.children)
            for child in x.children:
                child.parent = None
            x.children = set()
            if x is not c:
                removed.append(x)
        return parent, removed

    def check(self) -> None:
        """Invariants (tests): keys, parent links and segments agree."""
        for key, c in self._index.items():
            assert c.key == key, c
            assert (c.parent is None) == (c.segment == 0), c
            assert c.parent is None or (c.parent.key is not None and c in c.parent.children), c
            assert all(x.parent is c and x.key is not None and x.segment == c.segment + 1 for x in c.children), c
