"""A model-free runner for scheduler tests, and a loop that drives scheduler + runner like an engine.

A slot's "state" is the tuple of token ids it has absorbed; a checkpoint block holds the tuple of
tokens before its boundary. Executing a plan asserts what a real runner relies on: a slot holds
exactly the tokens before the row's first position, every block read holds exactly the prefix its
segment ends, no block is read and written in one step, write blocks match the boundaries crossed,
and the tables kept from the plans' diffs (released, appends, updates: what the CUDA runner keeps)
equal every row's and chunk's read list.
The sampled token is a hash of the state, so (like a real model) it depends only on the tokens seen:
a run that reuses cached prefixes must produce the tokens of a cold run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.plan import StepOutput, StepPlan
from mcserve.server.engine.scheduler import Scheduler
from mcserve.server.engine.sequence import Sequence

WeightFn = Callable[[int, int], float]  # (block id, segment) -> router weight this step


class FakeRunner:
    def __init__(self, config: EngineConfig, vocab_size: int = 50_000, weight_fn: WeightFn | None = None) -> None:
        self.C = config.segment_size
        self.vocab_size = vocab_size
        self.weight_fn = weight_fn or (lambda block, segment: 1.0)
        self.slots: dict[int, tuple[int, ...]] = {}
        self.blocks: dict[int, tuple[int, ...]] = {}
        self.host: dict[int, tuple[int, ...]] = {}
        self.tokens_computed = 0
        self.num_steps = 0
        self.tables: dict[int, list[int]] = {}  # seq_id -> table, from the diffs only

    def apply_diffs(self, plan: StepPlan) -> None:
        """Keep the tables as a runner with `keeps_tables` does, and check them against the read lists."""
        for seq_id in plan.released:
            self.tables.pop(seq_id, None)
        for e in plan.table_appends:
            table = self.tables.setdefault(e.seq_id, [])
            assert e.segment == len(table), (e, table)
            table.append(e.block)
        for e in plan.table_updates:
            assert e.segment < len(self.tables[e.seq_id]), (e, self.tables[e.seq_id])
            self.tables[e.seq_id][e.segment] = e.block
        for r in plan.decode:
            table = self.tables.get(r.seq_id, [])
            assert tuple(table[:r.position // self.C]) == r.block_table, (r, table)
            if r.write_block >= 0:
                assert table[r.position // self.C] == r.write_block, (r, table)
        for c in plan.prefill:
            table = self.tables.get(c.seq_id, [])
            assert tuple(table[:c.start_pos // self.C]) == c.read_blocks, (c, table)
            assert tuple(table[c.start_pos // self.C:c.end_pos // self.C]) == c.write_blocks, (c, table)

    def next_token(self, state: tuple[int, ...]) -> int:
        return hash(state) % self.vocab_size

    def execute(self, plan: StepPlan) -> StepOutput:
        C = self.C
        self.num_steps += 1
        self.apply_diffs(plan)
        for copy in plan.offloads:
            self.host[copy.dst] = self.blocks[copy.src]
        for copy in plan.onloads:
            self.blocks[copy.dst] = self.host[copy.src]
        for slot in plan.resets:
            self.slots[slot] = ()
        for r in plan.restores:
            self.slots[r.slot] = self.blocks[r.block_id]
        slots = [c.slot for c in plan.prefill] + [r.slot for r in plan.decode]
        assert len(set(slots)) == len(slots), f"slot used twice: {slots}"
        reads = {b for c in plan.prefill for b in c.read_blocks} | {b for r in plan.decode for b in r.block_table}
        writes = [b for c in plan.prefill for b in c.write_blocks] + [r.write_block for r in plan.decode]
        writes = [b for b in writes if b >= 0]
        assert len(set(writes)) == len(writes), f"block written twice: {writes}"
        assert not (set(writes) & reads), f"block read and written in one step: {set(writes) & reads}"
        tokens: dict[int, int] = {}
        weights: dict[int, float] = defaultdict(float)
        for c in plan.prefill:
            state = self._read(c.slot, c.start_pos, c.read_blocks, weights)
            pending = list(c.write_blocks)
            for t in c.token_ids:
                state += (t,)
                if len(state) % C == 0:
                    self.blocks[pending.pop(0)] = state
            assert not pending, f"unused write blocks {pending} in {c}"
            assert c.sample or len(state) % C == 0, f"chunk ends mid-segment without sampling: {c}"
            self.slots[c.slot] = state
            self.tokens_computed += len(c.token_ids)
            if c.sample:
                tokens[c.seq_id] = self.next_token(state)
        for r in plan.decode:
            state = self._read(r.slot, r.position, r.block_table, weights) + (r.token_id,)
            boundary = len(state) % C == 0
            assert (r.write_block >= 0) == boundary, r
            if boundary:
                self.blocks[r.write_block] = state
            self.slots[r.slot] = state
            self.tokens_computed += 1
            tokens[r.seq_id] = self.next_token(state)
        return StepOutput(tokens, dict(weights))

    def _read(self, slot: int, pos: int, blocks: tuple[int, ...], weights: dict[int, float]) -> tuple[int, ...]:
        state = self.slots[slot]
        assert len(state) == pos, f"slot {slot} holds {len(state)} tokens, row starts at {pos}"
        assert len(blocks) == pos // self.C, (len(blocks), pos)
        for seg, b in enumerate(blocks):
            if b >= 0:
                assert self.blocks[b] == state[:(seg + 1) * self.C], f"block {b} holds the wrong prefix"
                weights[b] += self.weight_fn(b, seg)
        return state


def check_plan(plan: StepPlan, config: EngineConfig) -> None:
    """Budgets and chunk rules of one plan."""
    C = config.segment_size
    assert plan.num_tokens <= config.max_num_batched_tokens, plan.num_tokens
    assert len(plan.decode) + len(plan.prefill) <= config.max_num_seqs
    for c in plan.prefill:
        assert c.token_ids and (c.end_pos % C == 0 or c.sample), c
        assert len(c.write_blocks) == c.end_pos // C - c.start_pos // C, c


def max_tokens(seq: Sequence) -> int:
    return seq.params.max_tokens if seq.params is not None else 8


class Driver:
    """Runs the engine loop: schedule -> execute -> update -> stop checks (max_tokens)."""

    def __init__(self, config: EngineConfig, weight_fn: WeightFn | None = None, check: bool = True) -> None:
        self.config = config
        self.scheduler = Scheduler(config)
        self.runner = FakeRunner(config, weight_fn=weight_fn)
        self.check = check
        self.finished: dict[int, Sequence] = {}
        self.plans: list[StepPlan] = []

    def add(self, seq: Sequence) -> Sequence:
        self.scheduler.add_request(seq)
        return seq

    def step(self) -> StepPlan:
        sched = self.scheduler
        plan = sched.schedule()
        check_plan(plan, self.config)
        self.plans.append(plan)
        out = self.runner.execute(plan)
        for seq in sched.update(plan, out):
            if not seq.is_finished and seq.num_output_tokens >= max_tokens(seq):
                sched.finish(seq.seq_id, "stop")
            if seq.is_finished:
                self.finished[seq.seq_id] = seq
        if self.check:
            self.verify()
        return plan

    def verify(self) -> None:
        self.scheduler.check()
        for seq in self.scheduler.running:
            state = self.runner.slots[seq.slot]
            assert state == tuple(seq.token_ids[:seq.num_computed_tokens]), f"slot of {seq} holds the wrong state"

    def run(self, max_steps: int = 10_000) -> int:
        """Step until every sequence finished; returns the number of steps."""
        for n in range(max_steps):
            if not self.scheduler.has_unfinished():
                return n
            self.step()
        raise AssertionError(f"not done after {max_steps} steps: {self.scheduler.running + self.scheduler.waiting}")
