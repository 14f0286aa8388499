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

from mcserve.kernels.gates import gdn_gates
from mcserve.kernels.prefill.batched import TORCH_KERNELS, PrefillKernels, batched_mc_gdn
from mcserve.kernels.prefill.varlen import PackedChunk, VarlenBatch, to_device
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.layers import (
    GatedDeltaNetAttention,
    GatedDeltaNetBlock,
    GatedMLP,
    GatedRMSNorm,
    RMSNorm,
    fuse_linears,
)

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
    """Where each chunk's conv inputs are. Torch path: rows of the extended input (per chunk its W-1
    conv-state rows, then its tokens). Both paths: each token's chunk and offset, and the conv windows
    to keep: W-1 inputs ending after each chunk's last token (n of them, then one per boundary), each
    entry a token row of the packed input or a column of the chunk's conv state before it."""

    rows: int
    state_rows: torch.Tensor  # [n * (W-1)]
    tok_rows: torch.Tensor  # [T]
    tok_seq: torch.Tensor  # [T] int32
    tok_off: torch.Tensor  # [T] int32
    win_tok: torch.Tensor  # [M, W-1] bool: the entry is a token of the chunk (else its conv state)
    win_row: torch.Tensor  # [M, W-1] its packed row (0 where not a token)
    win_col: torch.Tensor  # [M, W-1] its conv-state column (0 where a token)
    win_seq: torch.Tensor  # [M] the window's chunk
    bound_blocks: torch.Tensor  # [E] blocks of the windows n.. (M = n + E)


def _conv_layout(batch: VarlenBatch, w1: int) -> _ConvLayout:
    C = batch.segment_size
    state_rows, ends, blocks = [], [], []
    base = 0
    for i, ch in enumerate(batch.chunks):
        state_rows.extend(range(base, base + w1))
        base += w1 + ch.length
        ends.append((i, ch.length))
    for i, ch in enumerate(batch.chunks):
        for j, block in enumerate(ch.write_blocks):
            ends.append((i, (ch.start_pos // C + j + 1) * C - ch.start_pos))
            blocks.append(block)
    # the window after e tokens of chunk i: its inputs at offsets e - w1 .. e - 1 (negative: the state)
    offs = torch.tensor([[e - w1 + j for j in range(w1)] for _, e in ends], dtype=torch.long).reshape(len(ends), w1)
    starts = torch.tensor([batch.cu[i] for i, _ in ends], dtype=torch.long)
    lengths = torch.tensor([c.length for c in batch.chunks])
    n = torch.arange(len(lengths))
    tok_seq = torch.repeat_interleave(n, lengths)
    tok_off = torch.arange(batch.num_tokens) - torch.repeat_interleave(torch.tensor(batch.cu[:-1]), lengths)

    def t(x: torch.Tensor) -> torch.Tensor:
        return to_device(x, batch.device)

    return _ConvLayout(rows=base, state_rows=t(torch.tensor(state_rows, dtype=torch.long)),
                       tok_rows=t(torch.arange(batch.num_tokens) + (tok_seq + 1) * w1),  # i's tokens sit (i+1) w1 below
                       tok_seq=t(tok_seq.int()), tok_off=t(tok_off.int()), win_tok=t(offs >= 0),
                       win_row=t(torch.where(offs >= 0, starts[:, None] + offs, 0)),
                       win_col=t(torch.where(offs >= 0, 0, offs + w1)),
                       win_seq=t(torch.tensor([i for i, _ in ends], dtype=torch.long)),
                       bound_blocks=t(torch.tensor(blocks, dtype=torch.long)))


def _conv_windows(raw: torch.Tensor, prev: torch.Tensor, lay: _ConvLayout) -> torch.Tensor:
    """The conv states to keep [M, conv_dim, W-1] from the packed inputs raw [T, conv_dim] and each
    chunk's conv state before it, prev [n, conv_dim, W-1]."""
    tok = raw[lay.win_row]  # [M, W-1, D]
    st = prev.transpose(1, 2)[lay.win_seq[:, None], lay.win_col].to(raw.dtype)
    return torch.where(lay.win_tok[..., None], tok, st).transpose(1, 2)


def _keep_conv(li: int, win: torch.Tensor, slots: torch.Tensor, lay: _ConvLayout, states: StateSlots,
               ckpts: CheckpointBlocks) -> None:
    n = slots.shape[0]
    states.conv[li, slots] = win[:n]
    if lay.bound_blocks.numel():
        ckpts.conv[lay.bound_blocks, li] = win[n:].to(ckpts.conv.device)


def _conv_packed(attn: GatedDeltaNetAttention, x: torch.Tensor, conv_state: torch.Tensor, lay: _ConvLayout,
                 kernels: PrefillKernels) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x [T, d] -> ([q, k, v] after the causal conv + SiLU, the raw projections [T, conv_dim]).
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
    return list(torch.split(y, [cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)), raw


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
    tokens; `residual` counts 1 per head and token), the checkpoints made inside a chunk included.
    With fused kernels (`kernels.conv_heads`, CUDA) each layer's input projections and the MLP's gate
    and up become views of one weight each (`layers.fuse_linears`, what the decode step does too)."""
    spec, C, dev = model.spec, model.spec.segment_size, model.device
    batch = VarlenBatch([PackedChunk(c.slot, c.start_pos, len(c.token_ids), tuple(c.read_blocks),
                                     tuple(c.write_blocks), spec.top_k if c.top_k is None else c.top_k)
                         for c in chunks], C, dev)
    ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
    ids = to_device(ids, dev)
    read = spec.reads_cache and batch.table_width > 0
    total = torch.zeros(batch.num_chunks, batch.table_width, dtype=model.state_dtype, device=dev)
    layers = model.model.layers
    fused = kernels.conv_heads is not None and model.cfg.use_short_conv
    x = model.model.embeddings(ids)
    h = kernels.add_rmsnorm(x, None, layers[0].attn_norm.weight, layers[0].attn_norm.eps)[1] if fused else None
    for li, block in enumerate(layers):
        w = torch.zeros_like(total) if read else None
        if fused:
            nxt = layers[li + 1].attn_norm if li + 1 < len(layers) else None
            x, h = _fused_layer(model, li, block, x, h, nxt, batch, states, ckpts, kernels, w)
        else:
            x = _torch_layer(model, li, block, x, batch, states, ckpts, kernels, w)
        if w is not None:
            total += w
            if selections is not None:
                selections[li] += (w > 0).sum()
            if layer_weights is not None:
                layer_weights.append(w)
    ids, weights = batch.table.flatten(), total.flatten()
    if utility is not None and read:
        utility.index_add_(0, ids.clamp_min(0), torch.where(ids >= 0, weights, 0.0).to(utility.dtype))
    return BatchedPrefillOutput(_chunk_logits(model, x, chunks, batch.cu), ids, weights)


def _torch_layer(model: MCGatedDeltaNetForCausalLM, li: int, block: GatedDeltaNetBlock, x: torch.Tensor,
                 batch: VarlenBatch, states: StateSlots, ckpts: CheckpointBlocks, kernels: PrefillKernels,
                 w: torch.Tensor | None) -> torch.Tensor:
    """One layer with the model's torch modules around the core (and kernels.conv): x [T, d] -> x."""
    attn, sd = block.attn, model.state_dtype
    w1 = attn.cfg.conv_width
    lay = batch.memo(("conv", w1), lambda: _conv_layout(batch, w1))
    h = _norm(block.attn_norm, x, kernels)
    prev = states.conv[li, batch.slots]
    qkv, raw = _conv_packed(attn, h, prev, lay, kernels)
    q, k, v, g, beta, u = attn.heads(h, qkv, sd)
    y = batched_mc_gdn(q, k, v, g, beta, u, model.spec, batch, states.ssm[li], states.key_sum[li], ckpts.ssm[:, li],
                       ckpts.key[:, li], kernels, w)
    if w1:
        _keep_conv(li, _conv_windows(raw, prev, lay), batch.slots, lay, states, ckpts)
    x = x + _attn_output(attn, h, y, kernels)
    return x + _mlp(block.mlp, _norm(block.mlp_norm, x, kernels), kernels)


def _fused_layer(model: MCGatedDeltaNetForCausalLM, li: int, block: GatedDeltaNetBlock, x: torch.Tensor,
                 h: torch.Tensor, nxt: RMSNorm | None, batch: VarlenBatch, states: StateSlots, ckpts: CheckpointBlocks,
                 kernels: PrefillKernels, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer with fused kernels: one input matmul (q k v a b, gate, router), conv + SiLU + the q, k
    norms in one kernel, residual adds fused with the next norm. (x, h = attn_norm(x)) -> (x', h' =
    nxt(x')); nxt None (the last layer): h' None, the final norm is the logits'."""
    attn, cfg, sd, spec = block.attn, block.attn.cfg, model.state_dtype, model.spec
    T, H, dk, HV, dv, kd = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.num_v_heads_, cfg.head_v_dim, cfg.key_dim
    lay = batch.memo(("conv", cfg.conv_width), lambda: _conv_layout(batch, cfg.conv_width))
    # [T, P]: q k v | gate | u | a b | pad; P a multiple of FUSED_ROWS_ALIGN, so the rows and every
    # wide block's columns are 16-byte aligned (cuBLAS's sm90 kernels, vectorised loads in the conv)
    p = F.linear(h, fuse_linears(attn.in_linears()))
    cols = attn.in_columns()
    prev = states.conv[li, batch.slots]
    convs = attn._convs()
    wc = torch.cat([c.weight[:, 0, :] for c in convs])  # [conv_dim, W]
    bc = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
    q, k, v, q32, k32 = kernels.conv_heads(p[:, :cols.g], prev, lay.tok_seq, lay.tok_off, wc, bc, H, dk,
                                           spec.reads_cache)
    g, beta = gdn_gates(p[:, cols.a:cols.b], p[:, cols.b:cols.b + HV], attn.A_log, attn.dt_bias,
                        cfg.allow_neg_eigval, sd)
    u = q32 if attn.u_proj is None else p[:, cols.u:cols.u + kd].view(T, H, dk).to(sd)  # the query router reads q
    y = batched_mc_gdn(q, k, v.view(T, HV, dv), g, beta, u, spec, batch, states.ssm[li], states.key_sum[li],
                       ckpts.ssm[:, li], ckpts.key[:, li], kernels, w, k_keys=k32)
    if kernels.keep_windows is not None and ckpts.conv.device == p.device:
        kernels.keep_windows(p[:, :cols.g], prev, lay.win_tok, lay.win_row, lay.win_col, lay.win_seq, batch.slots,
                             lay.bound_blocks, states.conv[li], ckpts.conv[:, li])
    else:
        _keep_conv(li, _conv_windows(p[:, :cols.g], prev, lay), batch.slots, lay, states, ckpts)
    gate = p[:, cols.g:cols.u].view(T, HV, dv) if cfg.use_gate else None
    y = y.to(x.dtype)
    o = kernels.gated_rmsnorm(y, gate, attn.o_norm.weight, attn.o_norm.eps, attn.o_norm.activation) \
        if gate is not None else kernels.rmsnorm(y, attn.o_norm.weight, attn.o_norm.eps)
    x, h = kernels.add_rmsnorm(x, attn.o_proj(o.reshape(T, -1)), block.mlp_norm.weight, block.mlp_norm.eps)
    gu = F.linear(h, fuse_linears([block.mlp.gate_proj, block.mlp.up_proj]))
    act = kernels.swiglu_fused(gu[:, :2 * block.mlp.gate_proj.out_features])  # the padding columns left out
    dx = block.mlp.down_proj(act)
    if nxt is None:
        return x + dx, None
    return kernels.add_rmsnorm(x, dx, nxt.weight, nxt.eps)


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
