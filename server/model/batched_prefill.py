"""One forward pass over every prefill chunk of a step, packed: `[total_tokens, hidden]` projections and
MLPs, per-sequence short convolutions and layer cores in the varlen layout (kernels/prefill/varlen.py).

Each chunk reads its sequence's state, key sum and conv state from its slot and leaves them there
updated; every boundary completed inside a chunk leaves its checkpoint, segment key and conv state in
its write block, readable by the chunk's later tokens. The layer core runs through a `PrefillKernels`
(torch rounds on CPU; fla + Triton on CUDA), chosen once by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mcserve.kernels.prefill.batched import TORCH_KERNELS, PrefillKernels, batched_mc_gdn
from mcserve.kernels.prefill.varlen import PackedChunk, VarlenBatch, to_device
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.layers import GatedDeltaNetAttention, GatedMLP, GatedRMSNorm, RMSNorm

if TYPE_CHECKING:
    from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

LOGITS = ("last", "all", "none")


@dataclass(frozen=True, slots=True)
class PrefillInput:
    """Tokens at positions start_pos.. of the sequence in `slot` (model.prefill's arguments, per chunk).

    read_blocks: the sequence's blocks of segments < start_pos // C (-1: a hole, not read);
    write_blocks: one block per boundary completed inside the chunk, in order (all >= 0);
    top_k: SSC's k (None: the model's); logits: of the last token, of every token (prompt logprobs,
    echo), or none (a chunk that does not end the prefill).
    """

    token_ids: Sequence[int]
    slot: int
    start_pos: int
    read_blocks: Sequence[int]
    write_blocks: Sequence[int]
    top_k: int | None = None
    logits: str = "last"

    def __post_init__(self) -> None:
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {self.logits!r}")


@dataclass(frozen=True, slots=True)
class BatchedPrefillOutput:
    logits: list[torch.Tensor | None]  # per chunk: [1, V] (last), [T, V] (all) or None
    block_ids: torch.Tensor  # [n * W] every chunk's memory table (read then write blocks), -1 = none
    block_weights: torch.Tensor  # [n * W] router weight each entry got, summed over layers, heads, tokens


@dataclass(frozen=True, slots=True)
class _ConvLayout:
    """Rows of the extended conv input: per chunk its W-1 conv-state rows, then its tokens."""

    rows: int
    state_rows: torch.Tensor  # [n * (W-1)]
    tok_rows: torch.Tensor  # [T]
    final: torch.Tensor  # [n, W-1] the rows that are each chunk's conv state after its last token
    bound: torch.Tensor  # [E, W-1] the same after each boundary's token
    bound_blocks: torch.Tensor  # [E]


def _conv_layout(batch: VarlenBatch, w1: int) -> _ConvLayout:
    C = batch.segment_size
    state_rows, final, bound, blocks = [], [], [], []
    base = 0
    for ch in batch.chunks:
        state_rows.extend(range(base, base + w1))
        # after e tokens of the chunk its last w1 inputs are extended rows base + e .. base + e + w1 - 1
        final.append(list(range(base + ch.length, base + ch.length + w1)))
        for j, block in enumerate(ch.write_blocks):
            e = (ch.start_pos // C + j + 1) * C - ch.start_pos
            bound.append(list(range(base + e, base + e + w1)))
            blocks.append(block)
        base += w1 + ch.length
    dev = batch.device

    def t(x: list, *shape: int) -> torch.Tensor:
        return to_device(torch.tensor(x, dtype=torch.long).reshape(*shape), dev)

    # chunk i's tokens sit (i + 1) * w1 rows below their packed rows
    lengths = torch.tensor([c.length for c in batch.chunks])
    tok_rows = torch.arange(batch.num_tokens) + torch.repeat_interleave((torch.arange(len(lengths)) + 1) * w1, lengths)
    return _ConvLayout(rows=base, state_rows=t(state_rows, -1), tok_rows=to_device(tok_rows, dev),
                       final=t(final, len(final), w1), bound=t(bound, len(bound), w1), bound_blocks=t(blocks, -1))


def _conv_packed(attn: GatedDeltaNetAttention, x: torch.Tensor, conv_state: torch.Tensor, lay: _ConvLayout,
                 kernels: PrefillKernels) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x [T, d] -> ([q, k, v] after the causal conv + SiLU, the extended input [rows, conv_dim]).
    conv_state [n, conv_dim, W-1]: each chunk's slot."""
    raw = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)  # [T, conv_dim]
    cfg = attn.cfg
    if not cfg.use_short_conv:
        return list(torch.split(F.silu(raw), [cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)), raw
    convs = attn._convs()
    weight = torch.cat([c.weight[:, 0, :] for c in convs])  # [conv_dim, W]
    bias = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
    ext = raw.new_empty(lay.rows, raw.shape[1])
    ext[lay.state_rows] = conv_state.transpose(1, 2).reshape(-1, raw.shape[1]).to(raw.dtype)
    ext[lay.tok_rows] = raw
    y = kernels.conv(ext, lay.tok_rows, weight, bias)
    return list(torch.split(y, [cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)), ext


@torch.inference_mode()
def prefill_batch(
    model: MCGatedDeltaNetForCausalLM,
    chunks: Sequence[PrefillInput],
    states: StateSlots,
    ckpts: CheckpointBlocks,
    kernels: PrefillKernels = TORCH_KERNELS,
    selections: torch.Tensor | None = None,  # [L] counter: (chunk, checkpoint) pairs read, per layer
    utility: torch.Tensor | None = None,  # [blocks] fp32: += router weight per block (the decode paths' rule)
    # gets each layer's router weights [chunks, table width] (tensor parallelism: a rank's weights are
    # partial sums over its heads, so it counts reads only once they are summed over the ranks)
    layer_weights: list[torch.Tensor] | None = None,
) -> BatchedPrefillOutput:
    """Run every chunk in one pass. Chunks must use distinct slots (plan.py's rule).

    `utility` gets, per block, the router weight its table entries got (summed over layers, heads and
    tokens; `residual` counts 1 per head and token), the checkpoints made inside a chunk included."""
    spec, C, dev, sd = model.spec, model.spec.segment_size, model.device, model.state_dtype
    batch = VarlenBatch([PackedChunk(c.slot, c.start_pos, len(c.token_ids), tuple(c.read_blocks),
                                     tuple(c.write_blocks), spec.top_k if c.top_k is None else c.top_k)
                         for c in chunks], C, dev)
    ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
    ids = to_device(ids, dev)
    slots = batch.slots
    read = spec.reads_cache and batch.table_width > 0
    total = torch.zeros(batch.num_chunks, batch.table_width, dtype=sd, device=dev)
    x = model.model.embeddings(ids)
    for li, block in enumerate(model.model.layers):
        attn = block.attn
        w1 = attn.cfg.conv_width
        lay = batch.memo(("conv", w1), lambda w1=w1: _conv_layout(batch, w1))
        h = _norm(block.attn_norm, x, kernels)
        qkv, ext = _conv_packed(attn, h, states.conv[li, slots], lay, kernels)
        q, k, v, g, beta, u = attn.heads(h, qkv, sd)
        w = torch.zeros_like(total) if read else None
        y = batched_mc_gdn(q, k, v, g, beta, u, spec, batch, states.ssm[li], states.key_sum[li], ckpts.ssm[:, li],
                           ckpts.key[:, li], kernels, w)
        if w is not None:
            total += w
            if selections is not None:
                selections[li] += (w > 0).sum()
            if layer_weights is not None:
                layer_weights.append(w)
        if w1:
            states.conv[li, slots] = ext[lay.final].transpose(1, 2)
            if lay.bound_blocks.numel():
                ckpts.conv[lay.bound_blocks, li] = ext[lay.bound].transpose(1, 2).to(ckpts.conv.device)
        x = x + _attn_output(attn, h, y, kernels)
        x = x + _mlp(block.mlp, _norm(block.mlp_norm, x, kernels), kernels)
    ids, weights = batch.table.flatten(), total.flatten()
    if utility is not None and read:
        utility.index_add_(0, ids.clamp_min(0), torch.where(ids >= 0, weights, 0.0).to(utility.dtype))
    return BatchedPrefillOutput(_chunk_logits(model, x, chunks, batch.cu), ids, weights)


def _norm(norm: RMSNorm, x: torch.Tensor, kernels: PrefillKernels) -> torch.Tensor:
    return norm(x) if kernels.rmsnorm is None else kernels.rmsnorm(x, norm.weight, norm.eps)


def _attn_output(attn: GatedDeltaNetAttention, x: torch.Tensor, y: torch.Tensor, kernels: PrefillKernels
                 ) -> torch.Tensor:
    """`attn.output(x, y)`, with the output norm fused when the kernels have it."""
    if kernels.gated_rmsnorm is None or kernels.rmsnorm is None:
        return attn.output(x, y)
    y = y.to(x.dtype)
    norm = attn.o_norm
    if attn.cfg.use_gate:
        assert isinstance(norm, GatedRMSNorm)
        o = kernels.gated_rmsnorm(y, attn.g_proj(x).view_as(y), norm.weight, norm.eps, norm.activation)
    else:
        o = kernels.rmsnorm(y, norm.weight, norm.eps)
    return attn.o_proj(o.reshape(x.shape[0], -1))


def _mlp(mlp: GatedMLP, x: torch.Tensor, kernels: PrefillKernels) -> torch.Tensor:
    if kernels.swiglu is None:
        return mlp(x)
    return mlp.down_proj(kernels.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def _chunk_logits(model: MCGatedDeltaNetForCausalLM, x: torch.Tensor, chunks: Sequence[PrefillInput],
                  cu: list[int]) -> list[torch.Tensor | None]:
    """The lm_head only on the rows some chunk asks logits of."""
    rows, spans = [], []
    for i, c in enumerate(chunks):
        first = len(rows)
        if c.logits == "last":
            rows.append(cu[i + 1] - 1)
        elif c.logits == "all":
            rows.extend(range(cu[i], cu[i + 1]))
        spans.append((first, len(rows)) if c.logits != "none" else None)
    if not rows:
        return [None] * len(chunks)
    idx = to_device(torch.tensor(rows, dtype=torch.long), x.device)
    logits = model._logits(x[idx])
    return [None if s is None else logits[s[0]:s[1]] for s in spans]
