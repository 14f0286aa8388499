from __future__ import annotations

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.cache.tree import PrefixTree


def _chain(tree: PrefixTree, name: bytes, n: int) -> list[Checkpoint]:
    out = []
    for i in range(n):
        c = Checkpoint(i, 0)
        assert tree.insert(c, name + bytes([i + 1]), name + bytes([i]))
        out.append(c)
    return out


def test_match_follows_the_longest_indexed_prefix() -> None:
    tree = PrefixTree()
    a = _chain(tree, b"a", 3)
    hashes = [b"a" + bytes([i]) for i in range(5)]
    assert tree.match(hashes, 4) == a and tree.match(hashes, 2) == a[:2]
    assert tree.match([b"b\0", b"b\1"], 1) == []
    assert a[1].parent is a[0] and a[1] in a[0].children and len(tree) == 3
    tree.check()


def test_insert_refuses_twins_and_orphans() -> None:
    tree = PrefixTree()
    (root,) = _chain(tree, b"a", 1)
    twin = Checkpoint(0, 0)
    assert not tree.insert(twin, root.key, b"a\0") and twin.key is None
    orphan = Checkpoint(1, 0)
    assert not tree.insert(orphan, b"x\2", b"x\1") and orphan.key is None  # parent never indexed
    assert len(tree) == 1


def test_remove_takes_the_subtree_and_reports_the_parent() -> None:
    tree = PrefixTree()
    a = _chain(tree, b"a", 3)
    branch = Checkpoint(2, 0)
    assert tree.insert(branch, b"branch", a[1].key)
    parent, removed = tree.remove(a[1])
    assert parent is a[0] and set(removed) == {a[2], branch}
    assert a[0].children == set() and len(tree) == 1
    assert all(c.key is None and c.parent is None and not c.children for c in a[1:] + [branch])
    tree.check()
