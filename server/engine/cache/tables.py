"""Per-sequence block tables: sequence id -> its checkpoints of segments 0, 1, ..., in order, the
reference counts they imply (`Checkpoint.refs` = the number of tables holding it, `holders` their seq
ids), and the diffs since the last `take_diffs` (plan.py), O(1) per change, so that a runner that
keeps the tables between steps is sent only what changed: released tables, appended entries, and
entries of held checkpoints whose GPU block changed (`moved`: offload, drop, onload). It also counts
each table's holes (entries not on the GPU) as they appear and go, so `has_hole` is O(1)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.plan import TableEntry


class BlockTables:
    def __init__(self) -> None:
        self._tables: dict[int, list[Checkpoint]] = {}
        self._released: list[int] = []
        self._appended: list[tuple[int, int]] = []  # (seq_id, segment) in order
        self._moved: dict[tuple[int, int], None] = {}  # (seq_id, segment), an ordered set
        self._holes: dict[int, int] = {}  # seq_id -> entries with gpu None; only tables that have some

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def get(self, seq_id: int) -> list[Checkpoint]:
        """The table (do not modify it); empty for an unknown sequence."""
        return self._tables.get(seq_id, [])

    def length(self, seq_id: int) -> int:
        return len(self._tables.get(seq_id, ()))

    def has_hole(self, seq_id: int) -> bool:
        """Whether some entry of the table is not on the GPU (offloaded or dropped). O(1)."""
        return seq_id in self._holes

    @property
    def holed(self) -> dict[int, int]:
        """seq_id -> holes, only for tables that have some (do not modify)."""
        return self._holes

    def start(self, seq_id: int, hits: Iterable[Checkpoint]) -> list[Checkpoint]:
        """A new table holding `hits` (a cached prefix; offloaded ones are holes until onloaded)."""
        assert seq_id not in self._tables, seq_id
        table = self._tables[seq_id] = list(hits)
        for c in table:
            c.refs += 1
            c.holders.add(seq_id)
        self._count_holes(seq_id, sum(c.gpu is None for c in table))
        self._appended.extend((seq_id, i) for i in range(len(table)))
        return table

    def append(self, seq_id: int, c: Checkpoint) -> None:
        table = self._tables.setdefault(seq_id, [])
        assert c.segment == len(table), (c, len(table))
        c.refs += 1
        c.holders.add(seq_id)
        table.append(c)
        self._count_holes(seq_id, c.gpu is None)
        self._appended.append((seq_id, c.segment))

    def cut(self, seq_id: int, start: int) -> list[Checkpoint]:
        """Drop table[start:] and their references; returns them, in table order."""
        table = self._tables[seq_id]
        dropped = table[start:]
        del table[start:]
        for c in dropped:
            c.refs -= 1
            c.holders.discard(seq_id)
            assert c.refs >= 0, c
        self._count_holes(seq_id, -sum(c.gpu is None for c in dropped))
        return dropped

    def remove(self, seq_id: int) -> None:
        assert not self._tables[seq_id], "cut the table first"
        assert seq_id not in self._holes, seq_id
        del self._tables[seq_id]
        self._released.append(seq_id)
        # diffs of this table not yet taken are moot (a re-admission in the same step starts a new one)
        self._appended = [e for e in self._appended if e[0] != seq_id]
        self._moved = {e: None for e in self._moved if e[0] != seq_id}

    def newest(self) -> set[Checkpoint]:
        """The last checkpoint of every table: the one its sequence's next tokens read first."""
        return {t[-1] for t in self._tables.values() if t}

    def moved(self, c: Checkpoint, hole: bool) -> None:
        """`c` left the GPU (hole: offload, drop) or came back to it (onload): its holders' entries go
        out as updates, and each holder has one hole more or less."""
        self._moved.update(((h, c.segment), None) for h in c.holders)
        for h in c.holders:
            self._count_holes(h, 1 if hole else -1)

    def _count_holes(self, seq_id: int, delta: int) -> None:
        if delta:
            n = self._holes.get(seq_id, 0) + delta
            assert n >= 0, (seq_id, n)
            if n:
                self._holes[seq_id] = n
            else:
                del self._holes[seq_id]

    def take_diffs(self) -> tuple[tuple[int, ...], tuple[TableEntry, ...], tuple[TableEntry, ...]]:
        """(released, table_appends, table_updates) since the last call, each entry with its block now."""
        def entry(seq_id: int, segment: int) -> TableEntry:
            c = self._tables[seq_id][segment]
            return TableEntry(seq_id, segment, -1 if c.gpu is None else c.gpu)

        appended = set(self._appended)
        appends = tuple(entry(*e) for e in self._appended)
        updates = tuple(entry(s, i) for s, i in self._moved if (s, i) not in appended and i < len(self._tables[s]))
        out = tuple(self._released), appends, updates
        self._released, self._appended, self._moved = [], [], {}
        return out

    def open_tables(self) -> list[int]:
        """Seq ids whose tables a runner keeping them may still hold: live ones and releases not yet taken."""
        return [*self._released, *self._tables]

    def released_elsewhere(self, seq_ids: Iterable[int]) -> None:
        """Report these tables as released in the next diffs (tables a runner keeps from a previous cache)."""
        self._released.extend(seq_ids)

    def block_ids(self, seq_id: int, start: int, end: int) -> tuple[int, ...]:
        """GPU block ids of table[start:end]; -1 where the checkpoint is not on the GPU."""
        return tuple(-1 if c.gpu is None else c.gpu for c in self._tables[seq_id][start:end])

    def held(self) -> Counter[Checkpoint]:
        """References per checkpoint, counted from the tables (for invariant checks)."""
        return Counter(c for t in self._tables.values() for c in t)

    def check(self) -> None:
        for seq_id, table in self._tables.items():
            assert [c.segment for c in table] == list(range(len(table))), seq_id
            assert all(seq_id in c.holders for c in table), seq_id
            assert self._holes.get(seq_id, 0) == sum(c.gpu is None for c in table), seq_id
        assert self._holes.keys() <= self._tables.keys(), "hole count of a removed table"
