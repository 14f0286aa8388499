"""The persistent batch on the device: one row per running sequence (its state slot, SSC k, block
table, next decode position and last token), plus the order of this step's decode rows.

Rows are assigned when a sequence first appears in a plan and freed when the plan releases it;
between those, the host sends only what changed (plan.py's diffs): released rows, new rows' slot and
k, table appends and updates (a block that moved: offload, onload, drop), rows that join the decode
set with their position and token, and the decode order when the set changed. Each step's decode
inputs are then gathered on the device from the persistent tensors and positions advance there
(`step_inputs`: one Triton launch on CUDA) and tokens come from the sampler (`tokens`), so a steady decode step sends
nothing at all. Host work per step: one pass over the plan's decode rows (their seq ids), O(1) each.

Row `capacity` is the padding row (slot -1, no table): CUDA graphs gather it for the rows of a
bucket past the real batch; the decode paths skip it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mcserve.kernels.decode.contract import DecodeBatch
from mcserve.server.engine.plan import StepPlan
from mcserve.server.engine.runner.staging import Staging


@dataclass(frozen=True, slots=True)
class RowChanges:
    """What `stage` changed on the host side of the batch this step (rows are batch row ids)."""

    cleared: list[int]  # rows whose sequences were released (free again)
    added: list[tuple[int, int]]  # (row, seq_id) of sequences that got a row this step
    joined: list[tuple[int, int]]  # (row, seq_id) of rows that joined the decode set this step


class DeviceBatch:
    def __init__(self, capacity: int, width: int, segment_size: int, default_k: int, device: torch.device) -> None:
        """capacity: rows (max_num_seqs); width: table entries per row (max_model_len / C, rounded up)."""
        self.capacity, self.width, self.C, self.device = capacity, max(1, width), segment_size, device
        self.pad_row = capacity
        rows = capacity + 1

        def full(fill: int, *shape: int) -> torch.Tensor:
            return torch.full(shape or (rows,), fill, dtype=torch.int64, device=device)

        self.slots = full(-1)
        self.positions = full(0)  # next decode position of each row
        self.tokens = full(0)  # last token of each row (the next decode input)
        self.top_k = full(default_k)
        self.table = full(-1, rows, self.width)  # [rows, width] block of segment i, -1 = none
        self.order = full(self.pad_row, capacity)  # this step's decode rows, then the padding row
        self.row_of: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._length = [0] * rows  # host copy of each row's table length
        self.decode_seqs: list[int] = []  # seq ids of order[:B]
        self.decode_rows: list[int] = []
        self._need = 0  # the longest table among decode rows (what the step's table width must cover)

    @property
    def num_decode(self) -> int:
        return len(self.decode_seqs)

    @property
    def table_width(self) -> int:
        """Entries the step's decode rows may read: the longest of their tables (at least 1)."""
        return max(1, self._need)

    def stage(self, plan: StepPlan, top_k_of: Callable[[int], int], staging: Staging) -> RowChanges:
        """Apply `plan`'s diffs on the host and stage them for the device (applied in `staging.send`).
        top_k_of(seq_id): SSC's k for a sequence that gets a row."""
        cleared, added = [], []
        for seq_id in plan.released:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self._free.append(row)
                self._length[row] = 0
                cleared.append(row)
        new: list[tuple[int, int, int]] = []  # (row, slot, k)

        def row_for(seq_id: int, slot: int) -> int:
            row = self.row_of.get(seq_id)
            if row is None:
                assert self._free, f"more than {self.capacity} sequences with rows"
                row = self.row_of[seq_id] = self._free.pop()
                new.append((row, slot, top_k_of(seq_id)))
                added.append((row, seq_id))
            return row

        slot_of = {c.seq_id: c.slot for c in plan.prefill}
        entries = []
        for e in plan.table_appends:
            row = row_for(e.seq_id, slot_of.get(e.seq_id, -1))
            assert e.segment == self._length[row], (e, self._length[row])
            self._length[row] += 1
            entries.append((row, e.segment, e.block))
        n_appends = len(entries)
        for e in plan.table_updates:
            row = self.row_of[e.seq_id]
            assert e.segment < self._length[row], (e, self._length[row])
            entries.append((row, e.segment, e.block))
        for c in plan.prefill:
            row_for(c.seq_id, c.slot)
        ids = [r.seq_id for r in plan.decode]
        joined: list[tuple[int, int, int]] = []
        joiners: list[tuple[int, int]] = []
        order = None
        if ids != self.decode_seqs:
            before = set(self.decode_seqs)
            rows = []
            for r in plan.decode:
                row = row_for(r.seq_id, r.slot)
                rows.append(row)
                if r.seq_id not in before or row in cleared:
                    assert r.token_id >= 0, r  # a joiner's token is on the host (not PENDING: async scheduling)
                    joined.append((row, r.position, r.token_id))
                    joiners.append((row, r.seq_id))
            order = rows + [self.pad_row] * max(0, len(self.decode_rows) - len(rows))
            self.decode_seqs, self.decode_rows = ids, rows
            self._need = max((self._length[row] for row in rows), default=0)
        elif n_appends:
            decoding = set(self.decode_rows) if len(self.decode_rows) < 4 * n_appends else None
            for row, _, _ in entries[:n_appends]:
                if decoding is None or row in decoding:
                    self._need = max(self._need, self._length[row])
        if any(slot < 0 for _, slot, _ in new):
            # a row created by a table append before any chunk of its sequence (a sequence put straight
            # into decoding, as benchmarks do): its slot comes from its decode row
            slot_of = {r.seq_id: r.slot for r in plan.decode}
            new = [(r, s if s >= 0 else slot_of[seq], k) for (r, s, k), (_, seq) in zip(new, added, strict=True)]
        self._stage_device(staging, cleared, new, entries, n_appends, joined, order)
        return RowChanges(cleared, added, joiners)

    def _stage_device(self, st: Staging, cleared, new, entries, n_appends, joined, order) -> None:
        if not (cleared or new or entries or joined or order is not None):
            return
        pieces = [st.put(np.asarray(x, dtype=np.int64)) if len(x) else None
                  for x in (cleared, new, entries[:n_appends], entries[n_appends:], joined)]
        order_piece = st.put(np.asarray(order, dtype=np.int64)) if order else None

        def apply() -> None:
            rows, new_p, appends, updates, joined_p = (None if p is None else p.get() for p in pieces)
            if rows is not None:
                self.table[rows] = -1
                self.slots[rows] = -1
            if new_p is not None:
                self.slots[new_p[:, 0]] = new_p[:, 1]
                self.top_k[new_p[:, 0]] = new_p[:, 2]
            for e in (appends, updates):  # in this order: an update may follow an append of the step
                if e is not None:
                    self.table[e[:, 0], e[:, 1]] = e[:, 2]
            if joined_p is not None:
                self.positions[joined_p[:, 0]] = joined_p[:, 1]
                self.tokens[joined_p[:, 0]] = joined_p[:, 2]
            if order_piece is not None:
                self.order[:order_piece.shape[0]] = order_piece.get()

        st.then(apply)

    def gather(self, rows: int, width: int, top_k_max: int) -> tuple[torch.Tensor, DecodeBatch]:
        """The decode inputs of order[:rows] (static shapes, no sync): (tokens [rows], DecodeBatch with a
        [rows, width] table view). A row's write block is its table entry for the segment its token ends."""
        idx = self.order[:rows]
        pos = self.positions[idx]
        full = self.table[idx]  # [rows, self.width]
        seg = (pos // self.C).clamp(max=self.width - 1)
        boundary = pos % self.C == self.C - 1
        write = torch.where(boundary, full.gather(1, seg[:, None])[:, 0], -1)
        batch = DecodeBatch(positions=pos, slots=self.slots[idx], block_table=full[:, :width], write_blocks=write,
                            top_k=self.top_k[idx], top_k_max=top_k_max)
        return self.tokens[idx], batch

    def advance(self, rows: int, positions: torch.Tensor) -> None:
        """After a decode step of order[:rows] at `positions`: each row's next position."""
        self.positions[self.order[:rows]] = positions + 1

    def step_inputs(self, rows: int, width: int, top_k_max: int, utility: torch.Tensor | None, scratch: int,
                    fused: bool) -> tuple[torch.Tensor, DecodeBatch]:
        """`gather`, then the rows' positions advanced (the step reads the gathered copy) and the
        utility of each row's write block zeroed (a fresh block's old weight is gone; rows without
        one zero `scratch`'s), all static and sync-free. fused: in one Triton launch
        (kernels/triton_step.py: `gather_rows`; on CUDA or under the interpreter) instead of a dozen
        torch indexing ops; it leaves the padding row's position as it is."""
        if not fused:
            tokens, batch = self.gather(rows, width, top_k_max)
            if utility is not None:
                utility.index_fill_(0, torch.where(batch.write_blocks >= 0, batch.write_blocks, scratch), 0.0)
            self.advance(rows, batch.positions)
            return tokens, batch
        from mcserve.kernels.triton_step import gather_rows

        tokens, pos, slots, top_k, table, write = gather_rows(self.order, self.positions, self.tokens, self.slots,
                                                              self.top_k, self.table, rows, width, self.C, utility,
                                                              scratch)
        return tokens, DecodeBatch(positions=pos, slots=slots, block_table=table, write_blocks=write, top_k=top_k,
                                   top_k_max=top_k_max)

    def host_table(self, seq_id: int) -> list[int]:
        """A row's table as the device holds it (tests; one device->host copy)."""
        row = self.row_of[seq_id]
        return self.table[row, :self._length[row]].tolist()
