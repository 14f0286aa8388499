"""One MC-GDN layer core over a packed batch of prefill chunks (varlen.py), whatever the path.

    segment keys (torch) -> online core (writes states and checkpoints) -> MC readout (reads them)

The core and the readout come from a `PrefillKernels`, picked once at start-up by `select_kernels`:
torch rounds (packed.py) on CPU; on CUDA fla-core's chunk kernel (fla.py) and the Triton readout
(triton.py), each falling back to its torch stage, with a log line, when it cannot run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.packed import core_rounds, readout_rounds, short_conv_rows
from mcserve.kernels.prefill.varlen import VarlenBatch, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefillKernels:
    """core(q, k, v, g, beta, batch, spec, state_pool, ckpt_pool) -> o [T, HV, dv];
    readout(o, q, u, k, key_sum0, batch, spec, ckpt_pool, ckpt_key_pool, weights) -> y [T, HV, dv];
    conv(ext, tok_rows, weight, bias) -> y [T, D] (the model's short conv over the packed chunks).
    Contracts: packed.py's `core_rounds`, `readout_rounds`, `short_conv_rows`, which every
    implementation equals.

    The fused glue (all None on the torch path; then the model's torch modules run): `conv_heads`
    (triton_conv.py: the conv from the raw projections and the slots' conv states, SiLU and the q, k
    norms in one pass), the norms of kernels/triton_norms.py, and kernels/triton_step.py's residual
    add + RMSNorm and SwiGLU of a fused gate-and-up row."""

    name: str
    core: Callable[..., torch.Tensor]
    readout: Callable[..., torch.Tensor]
    conv: Callable[..., torch.Tensor]
    # fused versions of the model's glue (kernels/triton_norms.py); None: the model's torch modules
    rmsnorm: Callable[..., torch.Tensor] | None = None
    gated_rmsnorm: Callable[..., torch.Tensor] | None = None
    swiglu: Callable[..., torch.Tensor] | None = None
    conv_heads: Callable[..., tuple[torch.Tensor, ...]] | None = None
    add_rmsnorm: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    swiglu_fused: Callable[..., torch.Tensor] | None = None
    # segment_keys(k, batch, key_sum_pool, ckpt_key_pool) -> key_sum0, `segment_keys`' contract in one
    # launch (triton_keys.py); None: index_add and the bookkeeping in torch
    segment_keys: Callable[..., torch.Tensor] | None = None
    # keep_windows(raw, prev, win_tok, win_row, win_col, win_seq, slots, blocks, slot_conv, block_conv):
    # the conv states after each chunk and each boundary into the pools in one launch (triton_conv.py);
    # None: gathers and index_puts in torch
    keep_windows: Callable[..., None] | None = None


TORCH_KERNELS = PrefillKernels("torch", core_rounds, readout_rounds, short_conv_rows)


def select_kernels(device: torch.device | str, spec: MCSpec, dtype: torch.dtype) -> PrefillKernels:
    """The fastest path that can run here for a model in `dtype`; says in the log what runs, and why
    when the GPU path falls back to a torch stage."""
    if torch.device(device).type != "cuda":
        return TORCH_KERNELS
    from mcserve.kernels.prefill import fla

    try:
        version = fla.check_supported(spec)
        core, core_name = functools.partial(fla.core_fla, dtype=dtype), f"fla-core {version}"
    except fla.FlaUnavailable as e:
        log.warning("prefill: %s; the online core runs in torch (slow on a GPU)", e)
        core, core_name = core_rounds, "torch"
    try:
        from mcserve.kernels import triton_norms, triton_step
        from mcserve.kernels.prefill.triton import readout_triton
        from mcserve.kernels.prefill.triton_conv import conv_heads_triton, keep_windows_triton
        from mcserve.kernels.prefill.triton_keys import segment_keys_triton
    except ImportError as e:
        log.warning("prefill: Triton is not importable (%s); the MC readout, conv and norms run in torch", e)
        log.info("prefill path: %s core, torch readout", core_name)
        return PrefillKernels(f"{core_name}+torch", core, readout_rounds, short_conv_rows)
    log.info("prefill path: %s core, triton readout, conv and norms", core_name)
    return PrefillKernels(f"{core_name}+triton", core, readout_triton, short_conv_rows, triton_norms.rmsnorm,
                          triton_norms.gated_rmsnorm, triton_norms.swiglu, conv_heads_triton,
                          triton_step.add_rmsnorm, triton_step.swiglu_fused, segment_keys_triton,
                          keep_windows_triton)


def segment_keys(
    k: torch.Tensor,  # [T, H, dk]
    batch: VarlenBatch,
    key_sum_pool: torch.Tensor,  # [slots, H, dk] running key sum of the current segment, updated
    ckpt_key_pool: torch.Tensor,  # [blocks, H, dk], written at the boundaries' blocks
) -> torch.Tensor:
    """Segment keys (mean of a segment's keys) of every boundary in the batch and the slots' new running
    sums. Returns each chunk's running key sum before the chunk [n, H, dk]."""
    T, H, dk = k.shape
    dt = key_sum_pool.dtype
    lay = batch.memo("segment_keys", lambda: _key_layout(batch))
    key_sum0 = key_sum_pool[batch.slots]  # a copy, taken before the write below
    sums = k.new_zeros(len(batch.pieces), H, dk, dtype=dt).index_add_(0, batch.tok_piece, k.to(dt))
    sums[lay.first] += torch.where(lay.mid[:, None, None], key_sum0, 0.0)  # chunk starts are distinct pieces
    if lay.end_blocks.numel():
        ckpt_key_pool[lay.end_blocks] = (sums[lay.ends] / batch.segment_size).to(ckpt_key_pool.dtype)
    key_sum_pool[batch.slots] = torch.where(lay.last_ends[:, None, None], 0.0, sums[lay.last])
    return key_sum0


@dataclass(frozen=True, slots=True)
class _KeyLayout:
    first: torch.Tensor  # [n] each chunk's first piece
    mid: torch.Tensor  # [n] bool: the chunk starts inside a segment
    ends: torch.Tensor  # [E] pieces that end on a boundary
    end_blocks: torch.Tensor  # [E] their blocks
    last: torch.Tensor  # [n] each chunk's last piece
    last_ends: torch.Tensor  # [n] bool: it ends on a boundary


def _key_layout(batch: VarlenBatch) -> _KeyLayout:
    C = batch.segment_size
    first, last = [0] * batch.num_chunks, [0] * batch.num_chunks
    for j, p in enumerate(batch.pieces):
        if p.first:
            first[p.seq] = j
        last[p.seq] = j
    ends = [j for j, p in enumerate(batch.pieces) if p.write_block >= 0]

    def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(torch.tensor(x, dtype=dtype), batch.device)

    return _KeyLayout(
        first=t(first), mid=t([c.start_pos % C != 0 for c in batch.chunks], torch.bool), ends=t(ends),
        end_blocks=t([batch.pieces[j].write_block for j in ends]), last=t(last),
        last_ends=t([batch.pieces[j].write_block >= 0 for j in last], torch.bool))


def batched_mc_gdn(
    q: torch.Tensor,  # [T, H, dk] L2-normalised, not scaled
    k: torch.Tensor,  # [T, H, dk]
    v: torch.Tensor,  # [T, HV, dv]
    g: torch.Tensor,  # [T, HV] log-decay
    beta: torch.Tensor,  # [T, HV]
    u: torch.Tensor,  # [T, H, dk] router queries
    spec: MCSpec,
    batch: VarlenBatch,
    state_pool: torch.Tensor,  # [slots, HV, dv, dk] a layer's view: read at the chunks' slots, then written
    key_sum_pool: torch.Tensor,  # [slots, H, dk]
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk] a layer's view: read through the tables, written at
    ckpt_key_pool: torch.Tensor,  # [blocks, H, dk]   the boundaries' blocks
    kernels: PrefillKernels = TORCH_KERNELS,
    weights: torch.Tensor | None = None,  # [n, table_width] += router weight of each table entry
    k_keys: torch.Tensor | None = None,  # [T, H, dk] k in the state dtype when k is in the model's (fused path)
) -> torch.Tensor:
    """y [T, HV, dv] (the layer output before o_norm) for every token of every chunk; afterwards each
    slot holds its chunk's final state, key sum, and every boundary's block its checkpoint and key.
    The core reads q, k as given; the segment keys and the router read `k_keys` (default k)."""
    k_keys = k if k_keys is None else k_keys
    key_sum0 = (kernels.segment_keys or segment_keys)(k_keys, batch, key_sum_pool, ckpt_key_pool)
    o = kernels.core(q, k, v, g, beta, batch, spec, state_pool, ckpt_pool)
    if not spec.reads_cache or batch.table_width == 0:
        return o
    return kernels.readout(o, q, u, k_keys, key_sum0, batch, spec, ckpt_pool, ckpt_key_pool, weights)
