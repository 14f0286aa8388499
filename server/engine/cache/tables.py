"""Per-sequence block tables: sequence id -> its checkpoints of segments 0, 1, ..., in order, and the
reference counts they imply (`Checkpoint.refs` = the number of tables holding it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mcserve.server.engine.cache.checkpoint import Checkpoint


class BlockTables:
    def __init__(self) -> None:
        self._tables: dict[int, list[Checkpoint]] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def get(self, seq_id: int) -> list[Checkpoint]:
        """The table (do not modify it); empty for an unknown sequence."""
        return self._tables.get(seq_id, [])

    def length(self, seq_id: int) -> int:
        return len(self._tables.get(seq_id, ()))

    def start(self, seq_id: int, hits: Iterable[Checkpoint]) -> list[Checkpoint]:
        """A new table holding `hits` (a cached prefix)."""
        assert seq_id not in self._tables, seq_id
        table = self._tables[seq_id] = list(hits)
        for c in table:
            c.refs += 1
        return table

    def append(self, seq_id: int, c: Checkpoint) -> None:
        table = self._tables.setdefault(seq_id, [])
        assert c.segment == len(table), (c, len(table))
        c.refs += 1
        table.append(c)

    def cut(self, seq_id: int, start: int) -> list[Checkpoint]:
        """Drop table[start:] and their references; returns them, in table order."""
        table = self._tables[seq_id]
        dropped = table[start:]
        del table[start:]
        for c in dropped:
            c.refs -= 1
            assert c.refs >= 0, c
        return dropped

    def remove(self, seq_id: int) -> None:
        assert not self._tables[seq_id], "cut the table first"
        del self._tables[seq_id]

    def newest(self) -> set[Checkpoint]:
        """The last checkpoint of every table: the one its sequence's next tokens read first."""
        return {t[-1] for t in self._tables.values() if t}

    def block_ids(self, seq_id: int, start: int, end: int) -> tuple[int, ...]:
        """GPU block ids of table[start:end]; -1 where the checkpoint is not on the GPU."""
        return tuple(-1 if c.gpu is None else c.gpu for c in self._tables[seq_id][start:end])

    def held(self) -> Counter[Checkpoint]:
        """References per checkpoint, counted from the tables (for invariant checks)."""
        return Counter(c for t in self._tables.values() for c in t)

    def check(self) -> None:
        for seq_id, table in self._tables.items():
            assert [c.segment for c in table] == list(range(len(table))), seq_id
