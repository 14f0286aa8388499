"""Decode metadata packing: every row's inputs land in their own [B] row, the table padded with -1."""

from __future__ import annotations

import random

import torch

from mcserve.server.engine.plan import DecodeRow
from mcserve.server.engine.runner.decode_batch import pack_decode


def _rows(seed: int, n: int) -> list[DecodeRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        table = tuple(rng.choice([-1, *range(40)]) for _ in range(rng.randrange(0, 7)))
        rows.append(DecodeRow(seq_id=100 + i, slot=rng.randrange(50), position=rng.randrange(300),
                              token_id=rng.randrange(500), block_table=table,
                              write_block=rng.choice([-1, -1, rng.randrange(40)])))
    return rows


def test_pack_decode_round_trips_every_field() -> None:
    rows = _rows(0, 7)
    ks = [None, 1, None, 3, None, None, 2]
    b = pack_decode(tuple(rows), ks, model_k=4, device=torch.device("cpu"))
    assert b.token_ids.tolist() == [r.token_id for r in rows]
    assert b.slots.tolist() == [r.slot for r in rows]
    assert b.positions.tolist() == [r.position for r in rows]
    assert b.write_blocks.tolist() == [r.write_block for r in rows]
    assert b.top_k is not None and b.top_k.tolist() == [4, 1, 4, 3, 4, 4, 2]
    assert b.top_k_max == 4
    width = max(len(r.block_table) for r in rows)
    assert b.block_table.tolist() == [list(r.block_table) + [-1] * (width - len(r.block_table)) for r in rows]
    assert b.write_rows.tolist() == [i for i, r in enumerate(rows) if r.write_block >= 0]
    assert all(b.meta[i].is_contiguous() for i in range(5))


def test_model_k_everywhere_passes_no_per_row_k() -> None:
    rows = _rows(1, 3)
    b = pack_decode(tuple(rows), [None] * 3, model_k=2, device=torch.device("cpu"))
    assert b.top_k is None and b.top_k_max == 2
