"""Iteration-level scheduling: which sequences run this step, with how many tokens, in which state
slots and checkpoint blocks. Pure CPU bookkeeping; the runner executes the StepPlan it returns.

Engine step: `plan = scheduler.schedule(); out = runner.execute(plan); seqs = scheduler.update(plan,
out)`; the engine then checks stop conditions of `seqs` and calls `finish`. `abort`/`finish` must be
called between steps (the engine loop serializes them).

Each step, in (priority, arrival) order:
1. decode: every running sequence past its prefill gets one token;
2. prefill: running sequences still in prefill get a chunk;
3. admission: waiting sequences, strictly in order, while max_num_seqs and the budget allow.

Chunk rule: a prefill chunk ends on a segment boundary or at the end of the prefill (then it samples).
The budget cuts a chunk only at a boundary; a sequence whose next boundary (or end) does not fit the
remaining budget waits for the next step. Since max_num_batched_tokens >= segment_size, a step with no
decode rows always fits one whole segment, so prefill always progresses.

Memory: a new checkpoint block comes from the cache (free, else evicting idle blocks). For the block
it needs to progress at all (a decode's boundary, a prefill chunk's first segment) a running sequence
may also take checkpoints that running sequences hold (offload/drop, see cache/cache.py) and,
failing that, preempt the worst sequence not yet scheduled this step, possibly itself (recompute:
its slot is parked as a snapshot or freed, its checkpoints released -- they stay cached -- and it
goes back to the waiting queue). Further segments of a chunk use free or idle blocks only: the chunk
gets shorter instead. Admissions use free or idle blocks only and never preempt. Slots never force
preemption: num_state_slots >= max_num_seqs and parked snapshots are evicted on demand.

Prefix reuse on admission: the deepest cached boundary b*C <= num_tokens - 1 (one token must be
computed to produce logits) is restored from checkpoint b-1; a parked snapshot at a later position of
the same segment is taken over instead; a sequence with `reuse_prefix` false (prompt logprobs) takes
neither. When the first chunk after the cached prefix cannot get a block, admission retries with one
cached segment less, down to a cold start (the hits it holds are not idle, so nothing else could
free a block for it). A sequence reaching max_model_len finishes with "length".

Async scheduling: `advance(plan)` right after a plan is launched counts its decode rows'
tokens as computed and appends a `PENDING` placeholder for each sampled token, so the next
`schedule` plans the next positions (they do not depend on the token values); `update(plan, out,
advanced=True)` fills the placeholders in when the step is collected. `schedule(hold=...)` leaves
out rows the engine knows end with the step in flight (max_tokens, max_model_len). A sequence
preempted while its token is still pending waits with the placeholder; no sequence with one is
admitted (its prompt would not be known). `finish` drops a sequence's placeholders (their tokens
are never collected): a sequence that finishes with one step still in flight keeps the state of
that step, one token more, and parks it under the tokens it consumed.

Exactness: a row or chunk planned with a hole in its read list (a checkpoint of an earlier segment
offloaded or dropped; only aggregations that read checkpoints care) computes a state a cold run
would not. From its first position (`Sequence.inexact_from`) on, the sequence registers no
checkpoint and parks no snapshot; what it computed before stays published.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from mcserve.server.engine.cache.cache import CheckpointCache
from mcserve.server.engine.client import EngineStats
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.plan import DecodeRow, PrefillChunk, SlotRestore, StepOutput, StepPlan
from mcserve.server.engine.sequence import FINISH_REASONS, PENDING, Sequence, SequenceStatus
from mcserve.server.engine.state_pool import StatePool
from mcserve.server.errors import QueueFullError

RUNNING = SequenceStatus.RUNNING


def _key(seq: Sequence) -> tuple[int, float, int]:
    return seq.sort_key


@dataclass
class _Step:
    """What one schedule() call has decided so far."""

    budget: int
    decode: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end)
    resets: list[int] = field(default_factory=list)
    restores: list[SlotRestore] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    def scheduled(self) -> set[int]:
        """Seq ids planned so far (built only when a victim is picked: rare, and O(batch) anyway)."""
        return {s.seq_id for s in self.decode} | {s.seq_id for s, _, _ in self.chunks}


class Scheduler:
    def __init__(self, config: EngineConfig, counters: Counter[str] | None = None, decode_tables: bool = True) -> None:
        """counters: where to count (a rebuilt scheduler continues its predecessor's). decode_tables:
        decode rows carry their whole block table (False for a runner that keeps the tables from the
        plans' diffs: the per-step host work then does not grow with the checkpoints per row)."""
        self.config = config
        self.decode_tables = decode_tables
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.pool = StatePool(config.num_state_slots, self.counters)
        self.cache = CheckpointCache(config.num_checkpoint_blocks, config.num_host_blocks,
                                     config.utility_decay, self.counters)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self._seqs: dict[int, Sequence] = {}
        self._step = 0

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def stats(self) -> EngineStats:
        pool, cache = self.pool, self.cache
        return EngineStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            state_slots_running=pool.num_held, state_slots_parked=pool.num_parked, state_slots_total=pool.num_slots,
            checkpoint_blocks_running=cache.num_held_blocks, checkpoint_blocks_cached=cache.num_cached_blocks,
            checkpoint_blocks_total=cache.num_blocks)

    def add_request(self, seq: Sequence) -> None:
        """Queue a new sequence whose prompt fits (`LLMEngine.validate` checked). Raises QueueFullError."""
        cfg = self.config
        assert seq.num_tokens < cfg.max_model_len, (seq.num_tokens, cfg.max_model_len)
        if len(self.waiting) >= cfg.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({cfg.max_waiting} requests); retry later")
        assert seq.status is SequenceStatus.WAITING and seq.seq_id not in self._seqs, seq
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=_key)

    def finish(self, seq_id: int, reason: str) -> Sequence | None:
        """End a sequence in any state and free what it holds at once. reason: stop/length/abort/error.
        A normally finished sequence leaves its state parked as an end-of-turn snapshot. Returns the
        sequence, or None if it is unknown (already finished)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.num_pending:  # tokens computed in a step still in flight, never output (async scheduling)
            self.counters["async_dropped_tokens"] += seq.num_pending
            seq.drop_pending()
        if seq.status is RUNNING:
            self.running.remove(seq)
            self._drop_slot(seq, park=reason in ("stop", "length"))
            self.cache.release(seq.seq_id)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus(reason)
        self.counters[f"finish_{reason}"] += 1
        return seq

    def abort(self, seq_id: int) -> bool:
        return self.finish(seq_id, "abort") is not None

    def schedule(self, hold: set[int] | frozenset[int] = frozenset()) -> StepPlan:
        """hold: seq ids of decode rows to leave out (async scheduling: they end with the step in flight)."""
        cfg = self.config
        self._step += 1
        self.cache.begin_step(self._step)
        st = _Step(budget=cfg.max_num_batched_tokens)
        prefilling: list[Sequence] = []
        C, max_len, maybe_holes = cfg.segment_size, cfg.max_model_len, self.cache.maybe_holes
        rows = st.decode
        # per-row work of every step: a mid-segment row with nothing to onload makes no call. A copy of
        # `running`: a boundary row may preempt a later sequence (which is then skipped: not RUNNING)
        for seq in self.running.copy():
            pos = seq.num_computed_tokens
            if pos < seq.num_prefill_tokens:
                prefilling.append(seq)
                continue
            if seq.status is not RUNNING or (hold and seq.seq_id in hold):
                continue
            assert pos == len(seq.token_ids) - 1 and pos < max_len, seq
            if (pos % C == C - 1 or (maybe_holes and seq.seq_id in maybe_holes)) \
                    and not self._prepare_decode(seq, pos, st):
                continue
            rows.append(seq)
        st.budget -= len(rows)
        for seq in prefilling:
            if seq.status is RUNNING and st.budget > 0:
                self._schedule_prefill(seq, st)
        while self.waiting and len(self.running) < cfg.max_num_seqs and st.budget > 0:
            if self.waiting[0].num_pending or not self._admit(self.waiting[0], st):
                break
        return self._build(st)

    def advance(self, plan: StepPlan) -> None:
        """A plan was launched and may be collected after the next plan is made: its decode rows' tokens
        count as computed now, each sampled token is a placeholder until `update(advanced=True)`
        (its prefill chunks are applied by `update` as usual)."""
        seqs = self._seqs
        for row in plan.decode:
            seq = seqs[row.seq_id]
            assert seq.num_computed_tokens == row.position == len(seq.token_ids) - 1, (seq, row)
            seq.num_computed_tokens += 1
            seq.token_ids.append(PENDING)
            seq.num_pending += 1

    def update(self, plan: StepPlan, output: StepOutput, advanced: bool = False) -> list[Sequence]:
        """Apply a step's results: advance positions, append sampled tokens, index the checkpoints
        written, feed SSC utilities. Returns the sequences that got a token (some may have just
        finished with "length" at max_model_len). advanced: the plan went through `advance`; its
        decode rows' tokens replace the placeholders (also of a sequence preempted since, which waits)."""
        C, seqs, tokens, max_len = self.config.segment_size, self._seqs, output.token_ids, self.config.max_model_len
        self.cache.add_weights(output.block_weights)
        updated, ended = [], []  # ended: got a token and reached max_model_len
        if advanced:
            for row in plan.decode:  # per-row work of every step
                seq = seqs.get(row.seq_id)
                if seq is None:  # finished since: its placeholders went with it
                    continue
                assert seq.token_ids[row.position + 1] == PENDING and seq.num_pending > 0, (seq, row)
                seq.token_ids[row.position + 1] = tokens[row.seq_id]
                seq.num_pending -= 1
                if row.write_block >= 0 and seq.status is RUNNING and seq.slot == row.slot:
                    self._register(seq, row.position // C)
                updated.append(seq)
                if len(seq.token_ids) - seq.num_pending >= max_len:
                    ended.append(seq)
        for row in plan.decode if not advanced else ():  # per-row work of every step: `_live`, `append_token` inlined
            seq = seqs.get(row.seq_id)
            if seq is None or seq.status is not RUNNING or seq.slot != row.slot:
                continue
            assert seq.num_computed_tokens == row.position, (seq, row)
            seq.num_computed_tokens += 1
            if row.write_block >= 0:
                self._register(seq, row.position // C)
            seq.token_ids.append(tokens[row.seq_id])
            updated.append(seq)
            if len(seq.token_ids) - seq.num_pending >= max_len:
                ended.append(seq)
        for chunk in plan.prefill:
            seq = self._live(chunk.seq_id, chunk.slot)
            if seq is None:
                continue
            assert seq.num_computed_tokens == chunk.start_pos, (seq, chunk.start_pos)
            seq.num_computed_tokens = chunk.end_pos
            for segment in range(chunk.start_pos // C, chunk.end_pos // C):
                self._register(seq, segment)
            if chunk.sample:
                seq.append_token(output.token_ids[seq.seq_id])
                updated.append(seq)
                if len(seq.token_ids) - seq.num_pending >= max_len:
                    ended.append(seq)
        for seq in ended:
            self.finish(seq.seq_id, "length")
        return updated

    def _prepare_decode(self, seq: Sequence, pos: int, st: _Step) -> bool:
        """A decode row's blocks: its write block at a boundary, its offloaded checkpoints back.
        False: no block for the boundary (the row waits)."""
        C = self.config.segment_size
        if pos % C == C - 1 and self._grow(seq, pos // C + 1, pos // C + 1, st) is None:
            return False
        self.cache.onload_holes(seq.seq_id)
        return True

    def _schedule_prefill(self, seq: Sequence, st: _Step) -> None:
        C, start = self.config.segment_size, seq.num_computed_tokens
        end = self._chunk_end(start, seq.num_prefill_tokens, st.budget)
        if end == start:
            return
        want = end // C
        reached = self._grow(seq, want, min(want, start // C + 1), st)
        if reached is None:
            return
        end = min(end, reached * C) if reached < want else end
        self.cache.onload_holes(seq.seq_id)
        self._add_chunk(seq, start, end, st)

    def _admit(self, seq: Sequence, st: _Step) -> bool:
        cfg, C = self.config, self.config.segment_size
        target = seq.num_tokens
        hashes, hits = [], []
        if cfg.enable_prefix_caching and seq.reuse_prefix:
            hashes = seq.prefix_hashes(C)
            hits = self.cache.match(hashes, (target - 1) // C)
        while True:
            n = self.cache.attach(seq.seq_id, hits)
            start, snap = n * C, None
            if cfg.snapshots and seq.reuse_prefix:
                snap = self.pool.find(hashes[n], seq.token_ids, start, target - 1)
                if snap is not None and snap.num_tokens > start:
                    start = snap.num_tokens
                else:
                    snap = None
            end = self._chunk_end(start, target, st.budget)
            if end == start:  # the budget left takes no chunk from here: wait for the next step
                self.cache.release(seq.seq_id)  # what it attached stays cached
                return False
            reached = self._grow(seq, end // C, 0, st)
            end = min(end, reached * C) if reached < end // C else end
            if end > start:
                break
            self.cache.release(seq.seq_id)  # no block for the first chunk: its hits are idle again
            if n == 0:
                return False  # not even a cold start finds a block: running sequences hold them all
            hits = hits[:n - 1]
        slot = self.pool.take(snap) if snap is not None else self.pool.alloc()
        assert slot is not None, "num_state_slots >= max_num_seqs guarantees a slot"
        if start == 0:
            st.resets.append(slot)
        elif snap is None:
            self.cache.pin(seq.seq_id, n - 1)  # the restore source
            st.restores.append(SlotRestore(slot, self.cache.block_ids(seq.seq_id, n - 1, n)[0]))
        self.waiting.remove(seq)
        seq.status, seq.slot = RUNNING, slot
        seq.num_computed_tokens, seq.num_prefill_tokens = start, target
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = start
        bisect.insort(self.running, seq, key=_key)
        self.counters["prefix_queries"] += 1
        self.counters["prefix_query_tokens"] += target
        self.counters["prefix_hit_tokens"] += start
        self._add_chunk(seq, start, end, st)
        return True

    def _chunk_end(self, start: int, target: int, budget: int) -> int:
        """Furthest allowed chunk end: the prefill's end if it fits, else the last boundary that does."""
        if target - start <= budget:
            return target
        C = self.config.segment_size
        return max(start, (start + budget) // C * C)

    def _grow(self, seq: Sequence, want: int, need: int, st: _Step) -> int | None:
        """Extend seq's checkpoint table towards `want` blocks. Up to `need` blocks, a running sequence
        may take held checkpoints (offload/drop) and then preempt the worst unscheduled running
        sequence; beyond `need` (a longer prefill chunk) it takes only free or idle blocks. Returns the
        table length reached, or None if `seq` itself was preempted."""
        evict_running = self.config.evict_running_checkpoints and seq.status is RUNNING
        while (have := self.cache.table_len(seq.seq_id)) < want:
            if self.cache.allocate(seq.seq_id, evict_running and have < need):
                continue
            if have >= need:
                return have
            scheduled = st.scheduled()
            victim = max((s for s in self.running if s.seq_id not in scheduled), key=_key)
            self._preempt(victim, st)
            if victim is seq:
                return None
        return want

    def _add_chunk(self, seq: Sequence, start: int, end: int, st: _Step) -> None:
        assert start < end <= seq.num_prefill_tokens, (seq, start, end)
        assert end % self.config.segment_size == 0 or end == seq.num_prefill_tokens, (start, end)
        st.chunks.append((seq, start, end))
        st.budget -= end - start

    def _preempt(self, seq: Sequence, st: _Step) -> None:
        self.running.remove(seq)
        self._drop_slot(seq, park=True)
        self.cache.release(seq.seq_id)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = seq.num_prefill_tokens = 0
        seq.inexact_from = None  # it recomputes from exact cached states
        seq.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_key)
        self.counters["preempt"] += 1
        st.preempted.append(seq.seq_id)

    def _drop_slot(self, seq: Sequence, park: bool) -> None:
        """Give back seq's slot, parked as a snapshot when it can be resumed from: its exact state at
        q = num_computed_tokens plus the cached checkpoints of every whole segment before q."""
        q, C = seq.num_computed_tokens, self.config.segment_size
        if park and self.config.snapshots and q > 0 and seq.inexact_from is None:
            k, hashes = q // C, seq.prefix_hashes(C)
            if len(self.cache.match(hashes, k)) == k:
                self.pool.park(seq.slot, hashes[k], seq.token_ids[k * C:q], q)
                seq.slot = None
                return
        self.pool.free(seq.slot)
        seq.slot = None

    def _register(self, seq: Sequence, segment: int) -> None:
        C = self.config.segment_size
        if seq.inexact_from is not None and seq.inexact_from < (segment + 1) * C:
            return  # computed around a hole
        if self.config.enable_prefix_caching:
            hashes = seq.prefix_hashes(self.config.segment_size)
            self.cache.register(seq.seq_id, segment, hashes[segment + 1], hashes[segment])

    def _live(self, seq_id: int, slot: int) -> Sequence | None:
        """The running sequence a plan row was for; None if it finished or was aborted meanwhile."""
        seq = self._seqs.get(seq_id)
        return seq if seq is not None and seq.status is RUNNING and seq.slot == slot else None

    def _build(self, st: _Step) -> StepPlan:
        # Built last: evictions while planning may have moved checkpoints of rows planned earlier.
        C, ids, tables = self.config.segment_size, self.cache.block_ids, self.decode_tables
        holed = self.cache.holed_tables if self.config.reads_checkpoints else None
        decode = []
        for seq in st.decode:  # per-row work of every step
            p, sid = seq.num_computed_tokens, seq.seq_id
            if p % C == C - 1:
                write = ids(sid, p // C, p // C + 1)[0]
                assert write >= 0, (seq, write)
            else:
                write = -1
            # only a table with a hole is looked at: its reads are table[:p // C] (the rest is the pinned write)
            if holed and sid in holed and seq.inexact_from is None:
                self._check_holes(seq, ids(sid, 0, p // C), p)
            decode.append(DecodeRow(sid, seq.slot, p, seq.token_ids[p], ids(sid, 0, p // C) if tables else (), write))
        prefill = []
        for seq, start, end in st.chunks:
            writes, reads = ids(seq.seq_id, start // C, end // C), ids(seq.seq_id, 0, start // C)
            self._check_holes(seq, reads, start)
            prefill.append(PrefillChunk(seq.seq_id, seq.slot, start, tuple(seq.token_ids[start:end]), reads, writes,
                                        end == seq.num_prefill_tokens))
            assert min(writes, default=0) >= 0, writes
        offloads, onloads = self.cache.take_transfers()
        released, appends, updates = self.cache.take_table_diffs()
        return StepPlan(self._step, tuple(decode), tuple(prefill), tuple(st.resets), tuple(st.restores),
                        offloads, onloads, tuple(st.preempted), released, appends, updates)

    def _check_holes(self, seq: Sequence, reads: tuple[int, ...], position: int) -> None:
        """Mark `seq` inexact from `position` if it reads around a hole there."""
        if seq.inexact_from is None and self.config.reads_checkpoints and -1 in reads:
            seq.inexact_from = position
            self.counters["inexact_sequences"] += 1

    def check(self) -> None:
        """Invariants between steps (tests): ownership is consistent and nothing leaked."""
        self.pool.check({s.slot for s in self.running})
        self.cache.check()
        C = self.config.segment_size
        assert all(s.status is RUNNING for s in self.running)
        assert all(s.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED) for s in self.waiting)
        assert len(self.running) + len(self.waiting) == len(self._seqs)
        assert self.waiting == sorted(self.waiting, key=_key) and self.running == sorted(self.running, key=_key)
        for s in self.running:
            assert self.cache.table_len(s.seq_id) == s.num_computed_tokens // C, s
        assert self.cache.num_tables == len(self.running)
