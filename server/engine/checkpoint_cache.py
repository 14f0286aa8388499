"""Ownership of checkpoint blocks: the GPU pool, the host (offload) pool, per-sequence tables, the
prefix index, and eviction by the sparse selective policy.

A `Checkpoint` is one logical checkpoint (the boundary state after segment `segment` of some token
prefix). It lives in a GPU block, or a host block (offloaded), or nowhere (dropped). Sequence tables
hold Checkpoints, not block ids, so an offload or onload moves a checkpoint for every sequence that
shares it; the runner sees -1 for segments not on the GPU.

Lifecycle: `allocate` gives a sequence a fresh block to write this step (pinned); `register` indexes it
under its prefix hash once written; `release` drops a sequence's references. An indexed checkpoint
with no references stays cached (idle) until evicted; an unindexed one is freed at once.

The index is a tree (parent = the previous segment's checkpoint) in which every entry is reachable
from a root: a checkpoint whose parent is not indexed is not indexed either, and removing one from
the index removes its subtree (idle descendants are freed, counted as `evict_unreachable`; held ones
stay private to their holders).

Eviction when a GPU block is needed and none is free (each action counted in `counters`):
1. `evict_idle`: drop an idle checkpoint, lowest utility first, leaves of the tree first (so cached
   chains stay whole); when no idle leaf is on the GPU (its children were offloaded), the
   lowest-utility idle checkpoint with its subtree;
2. (running sequences only, if allowed) the lowest-utility GPU checkpoint that sequences hold is
   offloaded to a host block (`offload`; a free one, else by dropping the lowest-utility idle host
   leaf, `evict_host`), or dropped when the host pool is full (`drop_running`). Its holders see a
   hole, which SSC cannot select, until it is onloaded (`onload`) when a holder is scheduled and
   an idle or free block is available;
3. fail: the scheduler preempts.
Checkpoints pinned in the current step (to be written, restored from, or onloaded) are never victims.

Table diffs (plan.py): every change of a table since the last `take_table_diffs` is recorded, O(1) per
change, so a runner that keeps the tables between steps is sent only what changed: released tables,
appended entries, and entries of held checkpoints whose GPU block changed (offload, drop, onload;
`holders` says whose tables to update).

Utility: u = u * decay^(steps since its last update) + router weight. Comparing u_a*d^(now-s_a) with
u_b*d^(now-s_b) does not depend on `now`, so an idle checkpoint's rank (log u - s log d) is fixed
until its utility changes, which lets step 1 use a heap with lazy invalidation.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable

from mcserve.server.engine.plan import BlockCopy, TableEntry
from mcserve.server.errors import ConfigError


def blocks_for_budget(bytes_per_block: int, budget_bytes: int, min_blocks: int) -> int:
    """How many checkpoint blocks `budget_bytes` holds; ConfigError when fewer than min_blocks."""
    if bytes_per_block <= 0:
        raise ConfigError(f"bytes_per_block must be positive, got {bytes_per_block}")
    blocks = budget_bytes // bytes_per_block
    if blocks < min_blocks:
        raise ConfigError(
            f"checkpoint memory budget of {budget_bytes} bytes ({budget_bytes / 2**30:.2f} GiB) holds {blocks}"
            f" blocks of {bytes_per_block} bytes, fewer than the {min_blocks} required: raise the budget to"
            f" at least {min_blocks * bytes_per_block} bytes")
    return blocks


class Checkpoint:
    __slots__ = ("segment", "key", "parent", "children", "gpu", "host", "refs", "holders", "utility", "stamp",
                 "version")

    def __init__(self, segment: int, gpu: int, now: int) -> None:
        self.segment = segment
        self.key: bytes | None = None  # prefix hash h_{segment+1} while indexed
        self.parent: Checkpoint | None = None  # indexed checkpoint of the previous segment, at register
        self.children: set[Checkpoint] = set()  # indexed checkpoints of the next segment
        self.gpu: int | None = gpu
        self.host: int | None = None
        self.refs = 1  # sequence tables holding it
        self.holders: set[int] = set()  # their seq ids (a table holds a checkpoint once)
        self.utility = 0.0  # as of step `stamp`
        self.stamp = now
        self.version = 0  # bumped on every change; stale heap entries are skipped

    def __repr__(self) -> str:
        return (f"Checkpoint(seg={self.segment}, gpu={self.gpu}, host={self.host}, refs={self.refs}, "
                f"u={self.utility:.3g}@{self.stamp}, indexed={self.key is not None})")


class CheckpointCache:
    def __init__(self, num_blocks: int, num_host_blocks: int = 0, decay: float = 1.0,
                 counters: Counter[str] | None = None) -> None:
        self.num_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.counters = Counter() if counters is None else counters
        self._log_decay = math.log(decay)
        self._decay = decay
        self._free = list(range(num_blocks - 1, -1, -1))
        self._free_host = list(range(num_host_blocks - 1, -1, -1))
        self._host_freed_now: list[int] = []  # onload sources: reusable only next step (copy order)
        self._by_gpu: dict[int, Checkpoint] = {}
        self._held_gpu = 0  # GPU checkpoints with refs > 0, kept in step so stats() stay O(1)
        self._by_host: dict[int, Checkpoint] = {}
        self._index: dict[bytes, Checkpoint] = {}
        self._tables: dict[int, list[Checkpoint]] = {}
        self._idle_heap: list[tuple[float, int, int, int, int, Checkpoint]] = []
        self._tiebreak = itertools.count()
        self._pinned: set[Checkpoint] = set()
        self._requeue: list[Checkpoint] = []  # idle candidates skipped while pinned
        self._offloaded_now: set[Checkpoint] = set()
        self._offloads: list[BlockCopy] = []
        self._onloads: list[BlockCopy] = []
        self._maybe_holes: set[int] = set()  # seq ids whose tables may hold offloaded checkpoints
        # table diffs since the last take_table_diffs: released seq ids, appended and moved entries
        self._released: list[int] = []
        self._appended: list[tuple[int, int]] = []  # (seq_id, segment) in order
        self._moved: dict[tuple[int, int], None] = {}  # (seq_id, segment), an ordered set
        # called (at most once a step) before a victim is picked: the router weights the runner holds
        self.weights_source: Callable[[], dict[int, float]] | None = None
        self._weights_pulled = -1
        self.now = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._by_gpu)

    @property
    def num_held_blocks(self) -> int:
        """GPU blocks that running sequences hold."""
        return self._held_gpu

    @property
    def num_cached_blocks(self) -> int:
        """GPU blocks no sequence holds (idle cache, evictable)."""
        return len(self._by_gpu) - self._held_gpu

    @property
    def num_used_host_blocks(self) -> int:
        return len(self._by_host)

    def begin_step(self, step: int) -> None:
        self.now = step
        self._free_host.extend(self._host_freed_now)
        self._host_freed_now.clear()
        self._pinned.clear()
        self._offloaded_now.clear()
        for c in self._requeue:
            self._touch(c)
        self._requeue.clear()

    def take_transfers(self) -> tuple[tuple[BlockCopy, ...], tuple[BlockCopy, ...]]:
        """(offloads, onloads) decided since the last call, in the order they must run."""
        out = tuple(self._offloads), tuple(self._onloads)
        self._offloads.clear()
        self._onloads.clear()
        return out

    def take_table_diffs(self) -> tuple[tuple[int, ...], tuple[TableEntry, ...], tuple[TableEntry, ...]]:
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

    def match(self, hashes: list[bytes], limit: int) -> list[Checkpoint]:
        """Cached checkpoints of the longest prefix: hashes = [h_0..h_n]; at most `limit` segments."""
        hits = []
        for h in hashes[1:limit + 1]:
            c = self._index.get(h)
            if c is None:
                break
            hits.append(c)
        return hits

    def attach(self, seq_id: int, hits: list[Checkpoint]) -> int:
        """Start `seq_id`'s table with cached `hits`, onloading offloaded ones (evicting idle blocks
        only). Stops at the first that cannot be brought back; returns how many were attached. The
        last one is pinned: the sequence restores from it this step."""
        assert seq_id not in self._tables
        # Hold them all first: an onload below may evict idle blocks, and must not take a later hit.
        table = self._tables[seq_id] = list(hits)
        for c in hits:
            c.refs += 1
            c.holders.add(seq_id)
            self._held_gpu += c.refs == 1 and c.gpu is not None
            self._rebase(c)
        for i, c in enumerate(hits):
            if c.gpu is None and not self._onload(c):
                self.release_from(seq_id, i)
                break
        if table:
            self._pinned.add(table[-1])
        self._appended.extend((seq_id, i) for i in range(len(table)))
        return len(table)

    def allocate(self, seq_id: int, evict_running: bool) -> bool:
        """Append a fresh checkpoint (to be written this step) to `seq_id`'s table. False when no block
        can be found with the eviction steps allowed (idle only, or also running holders)."""
        gpu = self._take_gpu(evict_running)
        if gpu is None:
            return False
        table = self._tables.setdefault(seq_id, [])
        c = Checkpoint(len(table), gpu, self.now)
        c.holders.add(seq_id)
        self._appended.append((seq_id, c.segment))
        self._by_gpu[gpu] = c
        self._held_gpu += 1
        self._pinned.add(c)
        table.append(c)
        return True

    def onload_holes(self, seq_id: int) -> None:
        """Bring a scheduled sequence's offloaded checkpoints back, evicting idle blocks only. O(1)
        unless the table may hold some (`_maybe_holes`)."""
        if seq_id not in self._maybe_holes:
            return
        left = False
        for c in self._tables.get(seq_id, ()):
            if c.gpu is None and c.host is not None:
                if c in self._offloaded_now:
                    left = True
                elif not self._onload(c):
                    return
        if not left:
            self._maybe_holes.discard(seq_id)

    @property
    def num_tables(self) -> int:
        return len(self._tables)

    def table_len(self, seq_id: int) -> int:
        return len(self._tables.get(seq_id, ()))

    def block_ids(self, seq_id: int, start: int, end: int) -> tuple[int, ...]:
        """GPU block ids of table[start:end]; -1 where the checkpoint is not on the GPU."""
        return tuple(-1 if c.gpu is None else c.gpu for c in self._tables[seq_id][start:end])

    def register(self, seq_id: int, segment: int, key: bytes, parent_key: bytes) -> None:
        """Index the freshly written checkpoint of `segment` under its prefix hash. If another
        checkpoint already has that key (identical prefixes computed concurrently), this one stays
        private to the sequence and is freed with it."""
        c = self._tables[seq_id][segment]
        assert c.key is None and c.gpu is not None, c
        parent = self._index.get(parent_key)
        if key in self._index or (segment > 0 and parent is None):
            return  # a twin is indexed already, or the chain is broken before it: unreachable
        c.key = key
        self._index[key] = c
        if segment > 0:
            c.parent = parent
            parent.children.add(c)

    def release(self, seq_id: int) -> None:
        """Drop every reference of `seq_id` (finish, abort, preemption)."""
        self.release_from(seq_id, 0)
        del self._tables[seq_id]
        self._maybe_holes.discard(seq_id)
        self._released.append(seq_id)
        # diffs of this table not yet taken are moot (a re-admission in the same step starts a new one)
        self._appended = [e for e in self._appended if e[0] != seq_id]
        self._moved = {e: None for e in self._moved if e[0] != seq_id}

    def release_from(self, seq_id: int, start: int) -> None:
        table = self._tables[seq_id]
        for c in table[start:]:
            c.refs -= 1
            c.holders.discard(seq_id)
            assert c.refs >= 0, c
            self._held_gpu -= c.refs == 0 and c.gpu is not None
            if c.refs == 0 and c.key is None:
                self._forget(c)
            else:
                self._rebase(c)
                self._touch(c)
        del table[start:]

    def add_weights(self, block_weights: dict[int, float]) -> None:
        """SSC feedback: router weight per GPU block read this step."""
        for gpu, w in block_weights.items():
            c = self._by_gpu.get(gpu)
            if c is not None:
                self._rebase(c)
                c.utility += w
                self._touch(c)

    def utility(self, c: Checkpoint) -> float:
        """Current (decayed) utility."""
        return c.utility * self._decay ** (self.now - c.stamp)

    def _rank(self, c: Checkpoint) -> tuple[float, int, int]:
        # Lowest first: utility (decay-invariant form), then least recently touched, then deepest.
        u = math.log(c.utility) - c.stamp * self._log_decay if c.utility > 0 else -math.inf
        return (u, c.stamp, -c.segment)

    def _rebase(self, c: Checkpoint) -> None:
        c.utility = self.utility(c)
        c.stamp = self.now

    def _touch(self, c: Checkpoint) -> None:
        """Record a change of `c`; (re)queue it if it is now an idle-eviction candidate."""
        c.version += 1
        if c.refs == 0 and c.gpu is not None and c.key is not None:
            heapq.heappush(self._idle_heap, (*self._rank(c), next(self._tiebreak), c.version, c))
            if len(self._idle_heap) > 4 * self.num_blocks + 64:
                self._idle_heap = [e for e in self._idle_heap if e[-1].version == e[-2]]
                heapq.heapify(self._idle_heap)

    def _take_gpu(self, evict_running: bool) -> int | None:
        if not self._free and self.weights_source is not None and self._weights_pulled != self.now:
            self._weights_pulled = self.now  # fresh utilities before a victim is picked
            self.add_weights(self.weights_source())
        if not self._free:
            if not self._evict_idle() and not (evict_running and self._evict_held()):
                return None
        return self._free.pop()

    def _evict_idle(self) -> bool:
        """Step 1: drop the lowest-utility idle leaf; if every idle block has indexed children (e.g.
        children offloaded to the host), the lowest-utility idle block with its subtree."""
        while self._idle_heap:
            *_, version, c = heapq.heappop(self._idle_heap)
            if version != c.version or c.refs or c.gpu is None or c.key is None:
                continue  # stale
            if c in self._pinned:
                self._requeue.append(c)
                continue
            if c.children:
                continue  # requeued by _unindex when its last indexed child goes
            self._unindex(c)
            self._free_gpu(c)
            self.counters["evict_idle"] += 1
            return True
        idle = [c for c in self._by_gpu.values() if c.refs == 0 and c not in self._pinned]
        if not idle:
            return False
        c = min(idle, key=self._rank)
        self._unindex(c)
        self._free_gpu(c)
        self.counters["evict_idle"] += 1
        return True

    def _evict_held(self) -> bool:
        """Step 2: offload (or drop) the lowest-utility GPU checkpoint that sequences hold."""
        held = [c for c in self._by_gpu.values() if c.refs and c not in self._pinned]
        if not held:
            return False
        c = min(held, key=self._rank)
        host = self._take_host()
        if host is not None:
            self._offloads.append(BlockCopy(c.gpu, host))
            self._by_host[host] = c
            c.host = host
            self._offloaded_now.add(c)
            self.counters["offload"] += 1
        else:
            if c.key is not None:
                self._unindex(c)
            self.counters["drop_running"] += 1
        self._free_gpu(c)
        return True

    def _take_host(self) -> int | None:
        if not self._free_host:
            idle = [c for c in self._by_host.values() if c.refs == 0 and not c.children]
            if not idle:
                return None
            c = min(idle, key=self._rank)
            self._unindex(c)
            self._free_host.append(c.host)
            del self._by_host[c.host]
            c.host = None
            self.counters["evict_host"] += 1
        return self._free_host.pop()

    def _onload(self, c: Checkpoint) -> bool:
        assert c.gpu is None and c.host is not None, c
        gpu = self._take_gpu(evict_running=False)
        if gpu is None:
            return False
        self._onloads.append(BlockCopy(c.host, gpu))
        del self._by_host[c.host]
        self._host_freed_now.append(c.host)
        c.host, c.gpu = None, gpu
        self._by_gpu[gpu] = c
        self._moved.update(((h, c.segment), None) for h in c.holders)
        self._held_gpu += c.refs > 0
        self._pinned.add(c)
        self.counters["onload"] += 1
        return True

    def _unindex(self, c: Checkpoint) -> None:
        """Remove `c` from the index with its indexed descendants, which no lookup can reach without
        it: idle ones are freed, held ones stay private to their holders. The caller frees `c`."""
        if c.parent is not None:
            c.parent.children.discard(c)
            self._touch(c.parent)  # may have become a leaf
            c.parent = None
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
            if x is not c and x.refs == 0:
                self._forget(x)
                self.counters["evict_unreachable"] += 1

    def _free_gpu(self, c: Checkpoint) -> None:
        self._held_gpu -= c.refs > 0
        if c.holders:  # offloaded or dropped while held: a hole in its holders' tables
            self._moved.update(((h, c.segment), None) for h in c.holders)
            self._maybe_holes.update(c.holders)
        del self._by_gpu[c.gpu]
        self._free.append(c.gpu)
        c.gpu = None
        c.version += 1

    def _forget(self, c: Checkpoint) -> None:
        """An unindexed checkpoint nobody holds: give its blocks back."""
        if c.gpu is not None:
            self._free_gpu(c)
        if c.host is not None:
            del self._by_host[c.host]
            self._free_host.append(c.host)
            c.host = None

    def check(self) -> None:
        """Invariants (tests): no block leaked or double-owned, refcounts match the tables."""
        assert len(self._free) + len(self._by_gpu) == self.num_blocks, "GPU block leaked"
        assert set(self._free).isdisjoint(self._by_gpu) and len(set(self._free)) == len(self._free)
        assert self._held_gpu == sum(1 for c in self._by_gpu.values() if c.refs), "held-block count drifted"
        host_free = self._free_host + self._host_freed_now
        assert len(host_free) + len(self._by_host) == self.num_host_blocks, "host block leaked"
        assert set(host_free).isdisjoint(self._by_host) and len(set(host_free)) == len(host_free)
        refs: Counter[Checkpoint] = Counter(c for t in self._tables.values() for c in t)
        every: Iterable[Checkpoint] = {*refs, *self._index.values(), *self._by_gpu.values(),
                                       *self._by_host.values()}
        for c in every:
            assert c.refs == refs[c] == len(c.holders), (c, refs[c])
            assert c.refs > 0 or c.key is not None, f"unheld unindexed checkpoint {c}"
            assert c.gpu is None or c.host is None, c
            assert c.gpu is None or self._by_gpu[c.gpu] is c, c
            assert c.host is None or self._by_host[c.host] is c, c
            assert c.key is None or (self._index[c.key] is c and (c.gpu is not None or c.host is not None)), c
            assert c.key is not None or (not c.children and c.parent is None), c
            assert c.key is None or (c.parent is None) == (c.segment == 0), c
            assert all(x.parent is c and x.key is not None for x in c.children), c
        for seq_id, table in self._tables.items():
            assert [c.segment for c in table] == list(range(len(table))), seq_id
