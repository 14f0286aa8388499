"""The checkpoint cache: who holds which checkpoint, what is indexed for reuse, and what to give up
when a GPU block is needed. The pieces it composes each own one thing: `BlockPool` (GPU and host
block ids), `BlockTables` (per-sequence tables, refcounts), `PrefixTree` (the index), `UtilityPolicy`
and `IdleHeap` (how useful a checkpoint is, idle victims in order), `PendingWeights` (held blocks'
router weight not yet credited), `TransferQueue` (this step's copies).

Lifecycle: `allocate` gives a sequence a fresh block to write this step (pinned); `register` indexes it
under its prefix hash once written; `release` drops a sequence's references. An indexed checkpoint
with no references stays cached (idle) until evicted; an unindexed one is freed at once. Removing a
checkpoint from the index removes its subtree (idle descendants are freed, counted as
`evict_unreachable`; held ones stay private to their holders).

Eviction when a GPU block is needed and none is free (each action counted in `counters`):
1. `evict_idle`: drop an idle checkpoint, lowest utility first, leaves of the tree first (so cached
   chains stay whole); when no idle leaf is on the GPU (its children were offloaded), the
   lowest-utility idle checkpoint with its subtree;
2. (running sequences only, if allowed) the GPU checkpoint that sequences hold with the lowest read
   rate (utility per step of life), sparing each sequence's newest, is offloaded to a host block
   (`offload`; a free one, else by dropping the lowest-utility idle host leaf, `evict_host`), or
   dropped when the host pool is full (`drop_running`). Its holders see a hole, which SSC cannot
   select, until it is onloaded (`onload`) when a holder is scheduled and an idle or free block is
   available; what they compute meanwhile is not published (scheduler.py);
3. fail: the scheduler preempts.
Checkpoints pinned in the current step (to be written, restored from, or onloaded) are never victims.
Why this order: docs/CACHING.md.

Table diffs (plan.py, tables.py): every change of a table since the last `take_table_diffs` is
recorded, so a runner that keeps the tables between steps is sent only what changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable

import numpy as np

from mcserve.server.engine.cache.blocks import BlockPool
from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.cache.pending import PendingWeights
from mcserve.server.engine.cache.tables import BlockTables
from mcserve.server.engine.cache.transfers import TransferQueue
from mcserve.server.engine.cache.tree import PrefixTree
from mcserve.server.engine.cache.utility import IdleHeap, UtilityPolicy
from mcserve.server.engine.plan import BlockCopy, TableEntry


class CheckpointCache:
    def __init__(self, num_blocks: int, num_host_blocks: int = 0, decay: float = 1.0,
                 counters: Counter[str] | None = None) -> None:
        self.num_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.counters = Counter() if counters is None else counters
        self.gpu = BlockPool(num_blocks)
        self.host = BlockPool(num_host_blocks)
        self.tables = BlockTables()
        self.tree = PrefixTree()
        self.policy = UtilityPolicy(decay)
        self._idle = IdleHeap(self.policy, num_blocks)
        self._transfers = TransferQueue()
        self._pinned: set[Checkpoint] = set()
        self._requeue: list[Checkpoint] = []  # idle candidates skipped while pinned
        self._held_gpu = 0  # GPU checkpoints with refs > 0, kept in step so stats() stay O(1)
        self._maybe_holes: set[int] = set()  # seq ids whose tables may hold offloaded checkpoints
        # called (at most once a step) before a victim is picked: the router weights the runner holds,
        # [num_blocks] (`add_block_weights`)
        self.weights_source: Callable[[], np.ndarray] | None = None
        self._pending = PendingWeights(num_blocks, decay)  # held blocks' weight, credited when next read
        self._weights_pulled = -1

    @property
    def now(self) -> int:
        return self.policy.now

    @property
    def num_free_blocks(self) -> int:
        return self.gpu.num_free

    @property
    def num_used_blocks(self) -> int:
        return len(self.gpu)

    @property
    def num_held_blocks(self) -> int:
        """GPU blocks that running sequences hold."""
        return self._held_gpu

    @property
    def num_cached_blocks(self) -> int:
        """GPU blocks no sequence holds (idle cache, evictable)."""
        return len(self.gpu) - self._held_gpu

    @property
    def num_used_host_blocks(self) -> int:
        return len(self.host)

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    def table_len(self, seq_id: int) -> int:
        return self.tables.length(seq_id)

    def block_ids(self, seq_id: int, start: int, end: int) -> tuple[int, ...]:
        """GPU block ids of table[start:end]; -1 where the checkpoint is not on the GPU."""
        return self.tables.block_ids(seq_id, start, end)

    def has_hole(self, seq_id: int) -> bool:
        """Whether `seq_id`'s table has an entry not on the GPU (offloaded or dropped); O(1)."""
        return self.tables.has_hole(seq_id)

    @property
    def holed_tables(self) -> Container[int]:
        """Seq ids with `has_hole` (read-only, live; empty, so false, in the usual case)."""
        return self.tables.holed

    @property
    def maybe_holes(self) -> Container[int]:
        """Seq ids for which `onload_holes` may have something to do (read-only, live)."""
        return self._maybe_holes

    def begin_step(self, step: int) -> None:
        self.policy.now = step
        self.host.begin_step()
        self.gpu.begin_step()
        self._pinned.clear()
        self._transfers.begin_step()
        for c in self._requeue:
            self._touch(c)
        self._requeue.clear()

    def take_transfers(self) -> tuple[tuple[BlockCopy, ...], tuple[BlockCopy, ...]]:
        """(offloads, onloads) decided since the last call, in the order they must run."""
        return self._transfers.take()

    def take_table_diffs(self) -> tuple[tuple[int, ...], tuple[TableEntry, ...], tuple[TableEntry, ...]]:
        """(released, table_appends, table_updates) since the last call, each entry with its block now."""
        return self.tables.take_diffs()

    def open_tables(self) -> list[int]:
        """Seq ids whose tables a runner keeping them may still hold: live ones and releases not yet taken."""
        return self.tables.open_tables()

    def released_elsewhere(self, seq_ids: Iterable[int]) -> None:
        """Report these tables as released in the next diffs (tables a runner keeps from a previous cache)."""
        self.tables.released_elsewhere(seq_ids)

    def match(self, hashes: list[bytes], limit: int) -> list[Checkpoint]:
        """Cached checkpoints of the longest prefix: hashes = [h_0..h_n]; at most `limit` segments."""
        return self.tree.match(hashes, limit)

    def attach(self, seq_id: int, hits: list[Checkpoint]) -> int:
        """Start `seq_id`'s table with cached `hits`, onloading offloaded ones (evicting idle blocks
        only). Stops at the first that cannot be brought back; returns how many were attached.
        Nothing is pinned but what was onloaded: an admission that fails gives the hits back as
        idle, evictable blocks (see `pin` for the restore source of one that succeeds)."""
        # Hold them all first: an onload below may evict idle blocks, and must not take a later hit.
        table = self.tables.start(seq_id, hits)
        for c in hits:
            if c.refs == 1 and c.gpu is not None:
                self._hold(c)
            self.policy.rebase(c)  # rank-neutral: no heap update needed
        for i, c in enumerate(hits):
            if c.gpu is None and not self._onload(c):
                self.release_from(seq_id, i)
                break
        return len(table)

    def pin(self, seq_id: int, segment: int) -> None:
        """Keep table[segment] where it is until the next step (a slot is restored from it)."""
        self._pinned.add(self.tables.get(seq_id)[segment])

    def allocate(self, seq_id: int, evict_running: bool) -> bool:
        """Append a fresh checkpoint (to be written this step) to `seq_id`'s table. False when no block
        can be found with the eviction steps allowed (idle only, or also running holders)."""
        c = Checkpoint(self.tables.length(seq_id), self.now)
        gpu = self._take_gpu(c, evict_running)
        if gpu is None:
            return False
        c.gpu = gpu
        self._pinned.add(c)
        self.tables.append(seq_id, c)
        self._hold(c)
        return True

    def onload_holes(self, seq_id: int) -> None:
        """Bring a scheduled sequence's offloaded checkpoints back, evicting idle blocks only. O(1)
        unless the table may hold some (`_maybe_holes`)."""
        if seq_id not in self._maybe_holes:
            return
        left = False
        for c in self.tables.get(seq_id):
            if c.gpu is None and c.host is not None:
                if self._transfers.offloaded_now(c):
                    left = True
                elif not self._onload(c):
                    return
        if not left:
            self._maybe_holes.discard(seq_id)

    def register(self, seq_id: int, segment: int, key: bytes, parent_key: bytes) -> None:
        """Index the freshly written checkpoint of `segment` under its prefix hash. If another
        checkpoint already has that key (identical prefixes computed concurrently), this one stays
        private to the sequence and is freed with it."""
        c = self.tables.get(seq_id)[segment]
        assert c.key is None and c.gpu is not None, c
        self.tree.insert(c, key, parent_key)

    def adopt(self, segment: int, key: bytes, parent_key: bytes) -> int | None:
        """Index a checkpoint restored from outside (a saved session) as idle, in a free or idle GPU
        block, pinned until the next step (the next segment's adoption must not evict it). Returns the
        block to write it to; None, and nothing changes, when no block can be had, the key is taken or
        the parent is not indexed."""
        if self.tree.get(key) is not None:
            return None
        c = Checkpoint(segment, self.now)
        gpu = self._take_gpu(c, evict_running=False)
        if gpu is None:
            return None
        c.gpu = gpu
        if not self.tree.insert(c, key, parent_key):
            self._free_gpu(c)
            return None
        self._pinned.add(c)
        self._touch(c)
        return gpu

    def forget_prefix(self, hashes: list[bytes]) -> None:
        """Unindex the chain `hashes` ([h_0..h_n]) starts and everything below it (a deleted session):
        idle checkpoints are freed, held ones stay private to their holders."""
        c = self.tree.get(hashes[1]) if len(hashes) > 1 else None
        if c is not None:
            self._unindex(c)
            if c.refs == 0:
                self._forget(c)

    def release(self, seq_id: int) -> None:
        """Drop every reference of `seq_id` (finish, abort, preemption)."""
        self.release_from(seq_id, 0)
        self.tables.remove(seq_id)
        self._maybe_holes.discard(seq_id)

    def release_from(self, seq_id: int, start: int) -> None:
        for c in self.tables.cut(seq_id, start):
            if c.refs == 0 and c.gpu is not None:
                self._unhold(c)  # its pending weight credited before it is ranked as idle
            if c.refs == 0 and c.key is None:
                self._forget(c)
            else:
                self.policy.rebase(c)
                self._touch(c)

    def add_weights(self, block_weights: dict[int, float]) -> None:
        """SSC feedback: router weight per GPU block read this step."""
        self._credit(block_weights.items())

    def add_block_weights(self, weights: np.ndarray) -> None:
        """SSC feedback held back by the runner: router weight per GPU block ([num_blocks] float64, or
        empty for none) since its last hand-over, decayed to now. Held blocks' shares wait in
        `PendingWeights` (vector operations, not a call per entry: B x checkpoints of them); the rest,
        idle blocks, are credited at once."""
        if len(weights):
            self._credit(zip(*self._pending.defer(weights, self.now), strict=True))

    def _credit(self, entries: Iterable[tuple[int, float]]) -> None:
        for gpu, w in entries:
            c = self.gpu.owner(gpu)
            if c is not None:
                self.policy.credit(c, w)
                self._touch(c)

    def utility(self, c: Checkpoint) -> float:
        """Current (decayed) utility."""
        if c.gpu is not None:
            self._take_pending(c)
        return self.policy.value(c)

    def _take_pending(self, c: Checkpoint) -> None:
        """Credit `c` (on the GPU) with its block's pending weight."""
        w = self._pending.take(c.gpu, self.now)
        if w:
            self.policy.credit(c, w)

    def _hold(self, c: Checkpoint) -> None:
        """`c` (on the GPU) got its first reference, or came back to the GPU held."""
        self._held_gpu += 1
        self._pending.held[c.gpu] = True

    def _unhold(self, c: Checkpoint) -> None:
        """`c` (on the GPU) lost its last reference, or leaves the GPU held: its pending weight is its own."""
        self._held_gpu -= 1
        self._take_pending(c)
        self._pending.held[c.gpu] = False

    def _touch(self, c: Checkpoint) -> None:
        """Record a change of `c`; (re)queue it if it is now an idle-eviction candidate."""
        c.version += 1
        if c.refs == 0 and c.gpu is not None and c.key is not None:
            self._idle.push(c)

    def _take_gpu(self, c: Checkpoint, evict_running: bool) -> int | None:
        if not self.gpu.num_free and self.weights_source is not None and self._weights_pulled != self.now:
            self._weights_pulled = self.now  # fresh utilities before a victim is picked
            self.add_block_weights(self.weights_source())
        if not self.gpu.num_free:
            if not self._evict_idle() and not (evict_running and self._evict_held()):
                return None
        return self.gpu.take(c)

    def _evict_idle(self) -> bool:
        """Step 1: drop the lowest-utility idle leaf; if every idle block has indexed children (e.g.
        children offloaded to the host), the lowest-utility idle block with its subtree."""
        while (c := self._idle.pop()) is not None:
            if c.refs or c.gpu is None or c.key is None:
                continue  # no longer idle
            if c in self._pinned:
                self._requeue.append(c)
                continue
            if c.children:
                continue  # requeued by _unindex when its last indexed child goes
            self._unindex(c)
            self._free_gpu(c)
            self.counters["evict_idle"] += 1
            return True
        idle = [c for c in self.gpu if c.refs == 0 and c not in self._pinned]
        if not idle:
            return False
        c = self.policy.lowest(idle)
        self._unindex(c)
        self._free_gpu(c)
        self.counters["evict_idle"] += 1
        return True

    def _evict_held(self) -> bool:
        """Step 2: offload (or drop) the GPU checkpoint that sequences hold with the lowest read rate,
        sparing the newest checkpoint of each sequence while any other is available."""
        held = [c for c in self.gpu if c.refs and c not in self._pinned]
        if not held:
            return False
        for b in self._pending.blocks():  # held checkpoints are ranked here: every pending share first
            c = self.gpu.owner(b)
            self._take_pending(c)
            self._touch(c)
        newest = self.tables.newest()
        c = self.policy.lowest_rate([x for x in held if x not in newest] or held)
        host = self._take_host(c)
        if host is not None:
            self._transfers.offload(c, c.gpu, host)
            c.host = host
            self.counters["offload"] += 1
        else:
            if c.key is not None:
                self._unindex(c)
            self.counters["drop_running"] += 1
        self._free_gpu(c)
        return True

    def _take_host(self, c: Checkpoint) -> int | None:
        if not self.host.num_free:
            idle = [x for x in self.host if x.refs == 0 and not x.children]
            if not idle:
                return None
            x = self.policy.lowest(idle)
            self._unindex(x)
            self.host.give_back(x.host)
            x.host = None
            self.counters["evict_host"] += 1
        return self.host.take(c)

    def _onload(self, c: Checkpoint) -> bool:
        assert c.gpu is None and c.host is not None, c
        gpu = self._take_gpu(c, evict_running=False)
        if gpu is None:
            return False
        self._transfers.onload(c.host, gpu)
        self.host.give_back(c.host, later=True)  # the copy reads it this step
        c.host, c.gpu = None, gpu
        self.tables.moved(c, hole=False)
        if c.refs > 0:
            self._hold(c)
        self._pinned.add(c)
        self.counters["onload"] += 1
        return True

    def _unindex(self, c: Checkpoint) -> None:
        """Remove `c` from the index with its indexed descendants: idle ones are freed, held ones
        stay private to their holders. The caller frees `c`."""
        parent, removed = self.tree.remove(c)
        if parent is not None:
            self._touch(parent)  # may have become a leaf
        for x in removed:
            if x.refs == 0:
                self._forget(x)
                self.counters["evict_unreachable"] += 1

    def _free_gpu(self, c: Checkpoint) -> None:
        if c.refs > 0:
            self._unhold(c)
        if c.holders:  # offloaded or dropped while held: a hole in its holders' tables
            self.tables.moved(c, hole=True)
            self._maybe_holes.update(c.holders)
        self.gpu.give_back(c.gpu)
        c.gpu = None
        c.version += 1

    def _forget(self, c: Checkpoint) -> None:
        """An unindexed checkpoint nobody holds: give its blocks back."""
        if c.gpu is not None:
            self._free_gpu(c)
        if c.host is not None:
            self.host.give_back(c.host)
            c.host = None

    def check(self) -> None:
        """Invariants (tests): no block leaked or double-owned, refcounts match the tables."""
        self.gpu.check("GPU")
        self.host.check("host")
        assert self._held_gpu == sum(1 for c in self.gpu if c.refs), "held-block count drifted"
        held = np.zeros(self.num_blocks, dtype=np.bool_)
        held[[c.gpu for c in self.gpu if c.refs]] = True
        self._pending.check(held)
        self.tree.check()
        self.tables.check()
        refs = self.tables.held()
        for c in {*refs, *self.tree, *self.gpu, *self.host}:
            assert c.refs == refs[c] == len(c.holders), (c, refs[c])
            assert c.refs > 0 or c.key is not None, f"unheld unindexed checkpoint {c}"
            assert c.gpu is None or c.host is None, c
            assert c.gpu is None or self.gpu.owner(c.gpu) is c, c
            assert c.host is None or self.host.owner(c.host) is c, c
            assert c.key is None or (self.tree.get(c.key) is c and (c.gpu is not None or c.host is not None)), c
            assert c.key is not None or (not c.children and c.parent is None), c
