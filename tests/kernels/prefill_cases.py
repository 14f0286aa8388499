"""Batches of prefill chunks at different positions, with their pools, and the per-sequence oracle.

A case is a few sequences, each already prefilled up to its chunk's start (states and checkpoints in
NaN-poisoned pools), whose chunks then run in one packed batch. The oracle runs
kernels/prefill/torch.py's per-sequence `chunked_mc_gdn` on each chunk, one segment piece at a time,
so that it also reports the router weight of the checkpoints made inside the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.torch import chunked_mc_gdn
from mcserve.kernels.prefill.varlen import PackedChunk, VarlenBatch
from tests.kernels.inputs import F64, core_inputs, zero_state


@dataclass
class Case:
    spec: MCSpec
    batch: VarlenBatch
    x: tuple[torch.Tensor, ...]  # packed q, k, v, g, beta, u
    pools: list[torch.Tensor]  # state, key_sum, ckpt, ckpt_key
    seq_x: list[tuple[torch.Tensor, ...]]  # each sequence's whole inputs
    spans: list[tuple[int, int]]  # each chunk's [start, end)
    holes: list[set[int]]  # segments whose read block is a hole


def make_case(spec: MCSpec, spans: list[tuple[int, int]], H: int = 2, HV: int = 4, dk: int = 6, dv: int = 5,
              seed: int = 0, holes: list[set[int]] | None = None, top_k: list[int] | None = None,
              dtype: torch.dtype = F64, ckpt_dtype: torch.dtype | None = None, n_slots: int = 9,
              n_blocks: int = 64) -> Case:
    C = spec.segment_size
    holes = holes or [set() for _ in spans]
    top_k = top_k or [spec.top_k] * len(spans)
    seq_x = [core_inputs(b, H, HV, dk, dv, seed=seed * 100 + i) for i, (_, b) in enumerate(spans)]
    pools = [torch.full(s, float("nan"), dtype=dtype) for s in
             [(n_slots, HV, dv, dk), (n_slots, H, dk), (n_blocks, HV, dv, dk), (n_blocks, H, dk)]]
    if ckpt_dtype is not None:
        pools[2] = pools[2].to(ckpt_dtype)
    free = iter(torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    chunks = []
    for i, ((a, b), x) in enumerate(zip(spans, seq_x, strict=True)):
        slot = n_slots - 1 - i
        state, key_sum = zero_state(H, HV, dk, dv, dtype)
        y, state, key_sum, new, _ = chunked_mc_gdn(*(t[:a].to(dtype) for t in x), spec, 0, state, key_sum,
                                                   torch.zeros(0, HV, dv, dk, dtype=dtype),
                                                   torch.zeros(0, H, dk, dtype=dtype))
        pools[0][slot], pools[1][slot] = state, key_sum
        reads = []
        for s, (c, key) in enumerate(new):
            blk = next(free)
            pools[2][blk], pools[3][blk] = c, key
            reads.append(-1 if s in holes[i] else blk)
        writes = tuple(next(free) for _ in range(b // C - a // C))
        chunks.append(PackedChunk(slot, a, b - a, tuple(reads), writes, top_k[i]))
    packed = tuple(torch.cat([x[j][a:b] for x, (a, b) in zip(seq_x, spans, strict=True)]).to(dtype)
                   for j in range(6))
    return Case(spec, VarlenBatch(chunks, C, "cpu"), packed, pools, seq_x, spans, holes)


@dataclass
class Expected:
    y: torch.Tensor  # [T, HV, dv] packed
    states: list[torch.Tensor]
    key_sums: list[torch.Tensor]
    ckpts: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per chunk, the checkpoints it made
    weights: torch.Tensor  # [n, table_width]


def oracle(case: Case, chunk_size: int = 64) -> Expected:
    """chunked_mc_gdn per chunk, piece by piece (split at segment boundaries), from the pools as the
    case left them (read before the batch runs)."""
    spec, C = case.spec, case.spec.segment_size
    pools = case.pools
    ys, states, key_sums, made = [], [], [], []
    weights = torch.zeros(case.batch.num_chunks, case.batch.table_width, dtype=pools[0].dtype)
    for i, (ch, (a, b)) in enumerate(zip(case.batch.chunks, case.spans, strict=True)):
        state, key_sum = pools[0][ch.slot].clone(), pools[1][ch.slot].clone()
        blocks = list(ch.read_blocks)
        mem = [pools[2][max(x, 0)].to(state.dtype) for x in blocks]
        keys = [pools[3][max(x, 0)] for x in blocks]
        valid = [x >= 0 for x in blocks]
        made.append([])
        pos = a
        while pos < b:
            end = min(b, (pos // C + 1) * C)
            x = tuple(t[pos:end].to(state.dtype) for t in case.seq_x[i])
            n = len(mem)
            y, state, key_sum, new, w = chunked_mc_gdn(
                *x, spec, pos, state, key_sum,
                torch.stack(mem) if mem else torch.zeros(0, *state.shape, dtype=state.dtype),
                torch.stack(keys) if keys else torch.zeros(0, *key_sum.shape, dtype=state.dtype),
                torch.tensor(valid, dtype=torch.bool), chunk_size=chunk_size, top_k=ch.top_k)
            weights[i, :n] += w[:n]  # w also covers the checkpoint made at the piece end (0: none read it here)
            ys.append(y)
            for c, key in new:
                made[i].append((c, key))
                mem.append(c.to(pools[2].dtype).to(state.dtype))
                keys.append(key)
                valid.append(True)
            pos = end
        states.append(state)
        key_sums.append(key_sum)
    return Expected(torch.cat(ys), states, key_sums, made, weights)
