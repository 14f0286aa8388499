"""The packed (varlen) layout of many prefill chunks, shared by every batched prefill path.

Chunk i's tokens are rows cu[i]..cu[i+1] of the packed `[T, ...]` tensors. Each chunk is cut into
*pieces* at segment boundaries, so that every token of a piece sees the same cached memories. A
chunk's *memory table* is its read blocks (segments < start_pos // C, -1 for a hole) followed by its
write blocks (one per boundary completed inside the chunk): a token in segment s reads table[:s], so
the checkpoints written earlier in the same chunk are read like any other, from their blocks.

Everything here is built once per step on the host, copied to the device once, and shared by all
layers and all paths (torch rounds, fla, Triton); path-specific layouts are memoised on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class PackedChunk:
    """One prefill chunk as the kernels see it: `length` tokens at positions start_pos.. of the
    sequence whose online state is in `slot`."""

    slot: int
    start_pos: int
    length: int
    read_blocks: tuple[int, ...]  # segments 0 .. start_pos // C - 1; -1 = hole
    write_blocks: tuple[int, ...]  # one block (>= 0) per boundary completed inside the chunk
    top_k: int  # SSC's k for this chunk

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.length


@dataclass(frozen=True, slots=True)
class Piece:
    """Tokens of one chunk inside one segment: rows tok0 .. tok0 + length of the packed layout."""

    seq: int  # chunk index in the batch
    tok0: int
    length: int
    pos0: int  # position of the first token in its sequence
    segment: int  # pos0 // C: the number of memories its tokens see
    first: bool  # the chunk's first piece (it continues the slot's running key sum)
    write_block: int  # block of the checkpoint made at the piece's end, -1 if it ends inside a segment


class VarlenBatch:
    """Host lists (`chunks`, `cu`, `pieces`) and their device tensors for one step."""

    def __init__(self, chunks: Sequence[PackedChunk], segment_size: int, device: torch.device | str) -> None:
        assert chunks, "an empty batch"
        C = segment_size
        self.chunks = tuple(chunks)
        self.segment_size = C
        self.device = torch.device(device)
        self.cu = [0]
        pieces: list[Piece] = []
        for i, ch in enumerate(self.chunks):
            assert ch.length >= 1, ch
            assert len(ch.read_blocks) == ch.start_pos // C, (len(ch.read_blocks), ch.start_pos, C)
            n_bound = ch.end_pos // C - ch.start_pos // C
            assert len(ch.write_blocks) == n_bound and all(b >= 0 for b in ch.write_blocks), (ch, C)
            pos, tok, writes = ch.start_pos, self.cu[-1], iter(ch.write_blocks)
            while pos < ch.end_pos:
                end = min(ch.end_pos, (pos // C + 1) * C)
                block = next(writes) if end % C == 0 else -1
                pieces.append(Piece(i, tok, end - pos, pos, pos // C, pos == ch.start_pos, block))
                tok += end - pos
                pos = end
            self.cu.append(self.cu[-1] + ch.length)
        self.pieces = tuple(pieces)
        self.num_tokens = self.cu[-1]
        self.table_width = max(len(c.read_blocks) + len(c.write_blocks) for c in self.chunks)
        self._memo: dict[Any, Any] = {}

        rows = [
            [c.slot for c in self.chunks],
            [c.top_k for c in self.chunks],
            [c.start_pos for c in self.chunks],
        ]
        meta = torch.tensor(rows, dtype=torch.long)
        table = torch.full((len(self.chunks), self.table_width), -1, dtype=torch.long)
        for i, c in enumerate(self.chunks):
            blocks = c.read_blocks + c.write_blocks
            if blocks:
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        tok_piece = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([p.length for p in pieces]))
        self.slots, self.top_k, self.start_pos = (to_device(t, self.device) for t in meta)
        self.table, self.tok_piece = to_device(table, self.device), to_device(tok_piece, self.device)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def max_top_k(self) -> int:
        return max(c.top_k for c in self.chunks)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()` once per batch (per key): a path's own layout, shared by all layers."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to the device: pinned and non-blocking on CUDA, so that building a step's layouts
    never waits for the GPU (a pageable copy would synchronise the stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
