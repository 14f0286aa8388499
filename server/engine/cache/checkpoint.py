"""One logical checkpoint: the boundary state after segment `segment` of some token prefix.

It lives in a GPU block, or a host block (offloaded), or nowhere (dropped). Sequence tables hold
Checkpoints, not block ids, so an offload or onload moves a checkpoint for every sequence that
shares it. Each field is owned by one piece of the cache: `gpu`/`host` by the block pools, `key`/
`parent`/`children` by the prefix tree, `refs`/`holders` by the block tables, `utility`/`stamp` by the utility
policy; `version` is bumped on every change so that stale entries of the idle heap are skipped.
"""

from __future__ import annotations


class Checkpoint:
    __slots__ = ("segment", "key", "parent", "children", "gpu", "host", "refs", "holders", "utility", "stamp",
                 "born", "version")

    def __init__(self, segment: int, now: int) -> None:
        self.segment = segment
        self.key: bytes | None = None  # prefix hash h_{segment+1} while indexed
        self.parent: Checkpoint | None = None  # indexed checkpoint of the previous segment
        self.children: set[Checkpoint] = set()  # indexed checkpoints of the next segment
        self.gpu: int | None = None
        self.host: int | None = None
        self.refs = 0  # sequence tables holding it
        self.holders: set[int] = set()  # their seq ids (a table holds a checkpoint once)
        self.utility = 0.0  # as of step `stamp`
        self.stamp = now
        self.born = now  # the step that writes it
        self.version = 0

    @property
    def indexed(self) -> bool:
        return self.key is not None

    def __repr__(self) -> str:
        return (f"Checkpoint(seg={self.segment}, gpu={self.gpu}, host={self.host}, refs={self.refs}, "
                f"u={self.utility:.3g}@{self.stamp}, indexed={self.key is not None})")
