from __future__ import annotations

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.cache.tables import BlockTables


def test_tables_count_references_and_cut_from_the_end() -> None:
    tables = BlockTables()
    shared = [Checkpoint(0, 0), Checkpoint(1, 0)]
    shared[0].gpu, shared[1].gpu = 4, None  # segment 1 offloaded
    tables.start(1, shared)
    tables.start(2, shared[:1])
    own = Checkpoint(1, 0)
    own.gpu = 7
    tables.append(2, own)
    assert [c.refs for c in (*shared, own)] == [2, 1, 1]
    assert tables.block_ids(1, 0, 2) == (4, -1) and tables.block_ids(2, 0, 2) == (4, 7)
    assert tables.held() == {shared[0]: 2, shared[1]: 1, own: 1}
    assert tables.cut(2, 1) == [own] and own.refs == 0 and tables.length(2) == 1
    assert tables.cut(1, 0) == shared and [c.refs for c in shared] == [1, 0]
    tables.remove(1)
    assert 1 not in tables and 2 in tables and len(tables) == 1 and tables.get(1) == []
    tables.check()
