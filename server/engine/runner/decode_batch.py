"""Packing a plan's decode rows into the tensors `model.decode` takes, with one host->device copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcserve.server.engine.plan import DecodeRow

# Rows of the packed metadata before the block table.
_TOKEN, _SLOT, _POS, _WRITE, _TOPK, _TABLE = range(6)


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Every per-row input of one batched decode, on the device, plus what the host knows and the
    device would need a sync to find.

    meta: int64 [6 + N, B]: token, slot, position, write block, SSC k, then the block table (-1
        padded) transposed, so that each of the first rows is a contiguous [B] vector.
    write_rows: int64 [R] on the device, the rows that write a checkpoint this step.
    top_k_max: the largest SSC k of any row.
    any_request_k: some row lowers SSC's k (else the model's k serves every row and `top_k` is None).
    """

    meta: torch.Tensor
    write_rows: torch.Tensor
    top_k_max: int
    any_request_k: bool

    @property
    def token_ids(self) -> torch.Tensor:
        return self.meta[_TOKEN]

    @property
    def slots(self) -> torch.Tensor:
        return self.meta[_SLOT]

    @property
    def positions(self) -> torch.Tensor:
        return self.meta[_POS]

    @property
    def write_blocks(self) -> torch.Tensor:
        return self.meta[_WRITE]

    @property
    def top_k(self) -> torch.Tensor | None:
        return self.meta[_TOPK] if self.any_request_k else None

    @property
    def block_table(self) -> torch.Tensor:
        """[B, N] (a transposed view)."""
        return self.meta[_TABLE:].t()


def pack_decode(rows: tuple[DecodeRow, ...], ks: list[int | None], model_k: int,
                device: torch.device) -> DecodeBatch:
    """rows: the plan's decode rows; ks: each row's request k (None = the model's `model_k`)."""
    assert rows and len(ks) == len(rows), (len(rows), len(ks))
    width = max(len(r.block_table) for r in rows)
    cols, write_rows = [], []
    eff = [model_k if k is None else k for k in ks]
    for i, (r, k) in enumerate(zip(rows, eff, strict=True)):
        if r.write_block >= 0:
            write_rows.append(i)
        pad = (-1,) * (width - len(r.block_table))
        cols.append((r.token_id, r.slot, r.position, r.write_block, k, *r.block_table, *pad))
    meta = torch.tensor(cols, dtype=torch.long).t().contiguous()
    wr = torch.tensor(write_rows, dtype=torch.long)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
        wr = wr.pin_memory().to(device, non_blocking=True) if write_rows else wr.to(device)
    return DecodeBatch(meta, wr, max(eff), any(k is not None for k in ks))
