"""Counter-based random numbers for sampling on the device: a value is a hash of (row key, output
position, token id), so a row's noise depends on nothing else in the batch and needs no generator
state (the device sampler's seeded rows give the same tokens alone or batched).

The hash is `lowbias32` (Wellons' 32-bit integer hash, bias ~0.17), computed in int64 tensors with
every intermediate below 2^63: torch has no unsigned 32-bit arithmetic and int64 overflow is not
defined, so the 32-bit multiply is split into 16-bit halves. Works the same on CPU and CUDA tensors.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a constant c < 2^32, without overflow."""
    lo = (x & _M16) * c  # < 2^48
    hi = (((x >> 16) * c) & _M16) << 16  # (x_hi * c mod 2^16) * 2^16 < 2^32
    return (lo + hi) & _M32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> int64 in [0, 2^32). Shifts of non-negative int64 are logical."""
    x = x ^ (x >> 16)
    x = mul32(x, _C1)
    x = x ^ (x >> 15)
    x = mul32(x, _C2)
    return x ^ (x >> 16)


def split_key(key: int) -> tuple[int, int]:
    """A 64-bit row key as (high, low) 32-bit halves."""
    key &= (1 << 64) - 1
    return key >> 32, key & _M32


def row_hash(key_hi: torch.Tensor, key_lo: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[n] int64: one 32-bit value per (row key, output position)."""
    pos = position.to(torch.int64) & _M32
    return lowbias32(key_hi ^ lowbias32(key_lo ^ lowbias32(pos)))


def token_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64: each token id scattered over 32 bits (computed once per sampler)."""
    t = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return lowbias32(mul32(t, _GOLDEN))


def uniform(row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[n, V] float32 in (0, 1): 24 random bits per (row, token), never 0 or 1 (so log is finite)."""
    h = lowbias32(row[:, None] ^ tokens[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
