"""The plain-data contract between the scheduler and the model runner.

A runner executes one StepPlan in this order (later stages may read what earlier ones wrote):

1. `offloads`: copy GPU checkpoint block -> host block.
2. `onloads`: copy host block -> GPU checkpoint block (a GPU block may be the source of an offload
   and the target of an onload in the same step; step 1 must finish reading it first).
3. `resets`: zero these state slots (a sequence starting at position 0).
   `restores`: load a slot from a checkpoint block (resume at the end of that block's segment).
4. the forward pass: every `prefill` chunk and the `decode` rows. Rows use distinct slots; no block
   is both read and written in one step, so their order does not matter.
5. sample one token for every decode row and for every prefill chunk with `sample=True`.

Block ids index the GPU checkpoint pool ([num_blocks, ...]); -1 in a read list is a checkpoint that is
not on the GPU (dropped or offloaded): the runner skips it (SSC selects among the others).

Block tables as diffs: a runner that keeps every running sequence's table between steps applies, before
stage 1, `released` (tables that ended since the last plan: finished, aborted, preempted), then
`table_appends` (each a new last entry of a table, in order; a sequence's first entry starts its
table), then `table_updates` (entries whose block changed: offloaded or dropped -> -1, onloaded ->
its new block), each in order. The result is every running sequence's table, the same as the read
lists the rows and chunks carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DecodeRow:
    """Feed `token_id` at `position` to the sequence in `slot`. Not frozen, but never changed after the
    scheduler makes it: one is made per decode row per step, and a frozen dataclass's __init__
    (object.__setattr__ per field) costs ~3.5x as much, about 0.8 us per row.

    block_table: block ids of segments 0..position//C - 1, in order (-1 = skip); empty when the
        scheduler leaves the tables to the diffs below (`Scheduler(decode_tables=False)`).
    write_block: where to write the checkpoint of segment position//C when position % C == C-1, else -1.
    """

    seq_id: int
    slot: int
    position: int
    token_id: int
    block_table: tuple[int, ...]
    write_block: int


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Feed `token_ids` at positions start_pos.. to the sequence in `slot`.

    read_blocks: block ids of segments 0..start_pos//C - 1 (-1 = skip).
    write_blocks: one block per segment boundary completed inside the chunk, in order.
    The chunk ends on a segment boundary unless it ends the prefill, in which case `sample` is True.
    """

    seq_id: int
    slot: int
    start_pos: int
    token_ids: tuple[int, ...]
    read_blocks: tuple[int, ...]
    write_blocks: tuple[int, ...]
    sample: bool

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True)
class TableEntry:
    """Segment `segment` of sequence `seq_id`'s checkpoints is in GPU block `block` (-1: not on the GPU).
    Not frozen, but never changed after the cache makes it, as `DecodeRow` (one per boundary row per
    step)."""

    seq_id: int
    segment: int
    block: int


@dataclass(frozen=True, slots=True)
class SlotRestore:
    slot: int
    block_id: int


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy one checkpoint block: offload src=GPU block, dst=host block; onload the reverse."""

    src: int
    dst: int


@dataclass(frozen=True, slots=True)
class StepPlan:
    step: int
    decode: tuple[DecodeRow, ...] = ()
    prefill: tuple[PrefillChunk, ...] = ()
    resets: tuple[int, ...] = ()
    restores: tuple[SlotRestore, ...] = ()
    offloads: tuple[BlockCopy, ...] = ()
    onloads: tuple[BlockCopy, ...] = ()
    preempted: tuple[int, ...] = ()  # seq ids sent back to the waiting queue while planning (info)
    released: tuple[int, ...] = ()
    table_appends: tuple[TableEntry, ...] = ()
    table_updates: tuple[TableEntry, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(c.token_ids) for c in self.prefill)

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner to do (no rows and no copies)."""
        return not (self.decode or self.prefill or self.offloads or self.onloads)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What the runner reports back.

    token_ids: seq_id -> sampled token, for each decode row and each prefill chunk with `sample`.
    block_weights: GPU block id -> router weight it got this step (summed over layers, heads, tokens
        and rows); feeds each checkpoint's SSC utility.
    """

    token_ids: dict[int, int]
    block_weights: dict[int, float] = field(default_factory=dict)
