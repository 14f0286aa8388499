"""The online core of a packed prefill batch through fla-core's chunk kernel (CUDA only).

fla is imported here and nowhere else in the server, only when the CUDA path is selected. What this
relies on, read from fla-core 0.6.0's source (pinned in pyproject's `gpu` extra, checked at start-up):

- `chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first,
  cu_seqlens, cu_seqlens_cpu)`: q, k `[1, T, H, K]`, v `[1, T, HV, V]`, g (log-decay) and beta
  `[1, T, HV]`, one sequence per `cu_seqlens` span; with `state_v_first=True` the states are
  `[N, HV, V, K]` fp32, which is our `[HV, dv, dk]` slot layout, so states go in and out untransposed.
- It is `chunk_local_cumsum` (log2 space) -> `chunk_gated_delta_rule_fwd_intra` ->
  `chunk_gated_delta_rule_fwd_h` -> `chunk_fwd_o`, and `fwd_h` also returns `h [1, NT, HV, V, K]` (input
  dtype): the state at the start of every BT-token chunk of every sequence, chunks counted per
  sequence from its start (`chunk_offsets`). BT is 16, 32 or 64.

Checkpoints at segment boundaries, in one launch of each kernel for the whole batch:
- state_init=continue: each chunk is padded in front with `start_pos % BT` rows (k = 0, beta = 0,
  g = 0: the state is unchanged), so every multiple of BT of a sequence's positions starts a kernel
  chunk; with BT | C every boundary does, and its checkpoint is that chunk's `h` (the state after the
  boundary's token); a boundary at the chunk's end is its final state.
- state_init=reset: every segment piece is its own varlen sequence (zero initial state except the
  chunk's first piece, which continues the slot): checkpoints are the pieces' final states.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.triton_rows import copy_rows
from mcserve.kernels.prefill.varlen import VarlenBatch, to_device

REQUIRED = (0, 6)  # fla-core 0.6.x: the internal functions above have these names and layouts


class FlaUnavailable(RuntimeError):
    """fla-core cannot serve this model here (missing, wrong version, or an unsupported shape)."""


def _fla() -> SimpleNamespace:
    try:
        import fla
    except ImportError as e:
        raise FlaUnavailable(f"fla-core is not installed ({e}); install mcserve[gpu] (fla-core==0.6.0)") from e
    version = getattr(fla, "__version__", "unknown")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts != REQUIRED:
        raise FlaUnavailable(f"fla-core {version} found, mcserve needs {'.'.join(map(str, REQUIRED))}.x "
                             f"(install mcserve[gpu]: fla-core==0.6.0)")
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.index import prepare_chunk_indices

    return SimpleNamespace(version=version, chunk=chunk_gated_delta_rule, fwd_h=chunk_gated_delta_rule_fwd_h,
                           fwd_o=chunk_fwd_o, fwd_intra=chunk_gated_delta_rule_fwd_intra,
                           cumsum=chunk_local_cumsum, rcp_ln2=RCP_LN2, chunk_indices=prepare_chunk_indices)


def chunk_size(spec: MCSpec) -> int:
    """fla's chunk length: the largest of 64, 32, 16 that divides the segment size (continue needs one)."""
    for bt in (64, 32, 16):
        if spec.segment_size % bt == 0:
            return bt
    return 64


def check_supported(spec: MCSpec) -> str:
    """Raises FlaUnavailable with the reason when the fla core cannot run `spec`; returns fla's version."""
    version = _fla().version
    if not spec.reset and spec.segment_size % 16:
        raise FlaUnavailable(f"segment_size {spec.segment_size} is not a multiple of 16, so fla's chunk states "
                             "do not line up with the boundaries")
    return version


def chunk_with_states(q, k, v, g, beta, scale: float, h0: torch.Tensor, cu: torch.Tensor, cu_cpu: torch.Tensor,
                      bt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fla's forward, keeping the per-chunk states: (o [1, T, HV, V], h [1, NT, HV, V, K], final [N, HV, V, K])."""
    ops = _fla()
    ci = ops.chunk_indices(cu, bt, cu_seqlens_cpu=cu_cpu)
    gc = ops.cumsum(g, chunk_size=bt, scale=ops.rcp_ln2, cu_seqlens=cu, chunk_indices=ci)
    w, u, _ = ops.fwd_intra(k=k, v=v, g=gc, beta=beta, cu_seqlens=cu, chunk_size=bt, chunk_indices=ci)
    h, v_new, final = ops.fwd_h(k=k, w=w, u=u, g=gc, initial_state=h0, output_final_state=True, chunk_size=bt,
                                state_v_first=True, cu_seqlens=cu, chunk_indices=ci)
    o = ops.fwd_o(q=q, k=k, v=v_new, h=h, g=gc, scale=scale, state_v_first=True, cu_seqlens=cu, chunk_size=bt,
                  chunk_indices=ci)
    return o, h, final


def chunk_final(q, k, v, g, beta, scale: float, h0: torch.Tensor, cu: torch.Tensor, cu_cpu: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's public varlen forward: (o [1, T, HV, V], final [N, HV, V, K])."""
    return _fla().chunk(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                        state_v_first=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)


@dataclass(frozen=True, slots=True)
class _Continue:
    cu: torch.Tensor  # [n + 1] padded sequence starts (device)
    cu_cpu: torch.Tensor
    dest: torch.Tensor | None  # [T] padded row of each token; None when no chunk needs padding
    rows: int  # padded length
    inner_h: torch.Tensor  # [I] chunk (in h) whose start is an interior boundary
    inner_blocks: torch.Tensor  # [I]
    end_seqs: torch.Tensor  # [E] chunks that end on a boundary
    end_blocks: torch.Tensor  # [E]


def _continue_layout(batch: VarlenBatch, bt: int) -> _Continue:
    C, dev = batch.segment_size, batch.device
    cu, inner, ends, chunks_before = [0], [], [], 0
    for i, ch in enumerate(batch.chunks):
        pad = ch.start_pos % bt
        for j, block in enumerate(ch.write_blocks):
            b = (ch.start_pos // C + j + 1) * C
            if b < ch.end_pos:
                inner.append((chunks_before + (b - ch.start_pos + pad) // bt, block))
            else:
                ends.append((i, block))
        cu.append(cu[-1] + pad + ch.length)
        chunks_before += -(-(pad + ch.length) // bt)
    padded = cu[-1] != batch.num_tokens

    def t(x: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(x, dtype=torch.long), dev)

    cu_cpu = torch.tensor(cu, dtype=torch.long)
    dest = None
    if padded:  # token j of chunk i goes to padded row cu[i] + pad_i + j = its packed row + (cu[i] + pad_i - cu_i)
        shift = torch.tensor([cu[i] + c.start_pos % bt - batch.cu[i] for i, c in enumerate(batch.chunks)])
        lengths = torch.tensor([c.length for c in batch.chunks])
        dest = to_device(torch.arange(batch.num_tokens) + torch.repeat_interleave(shift, lengths), dev)
    return _Continue(cu=to_device(cu_cpu, dev), cu_cpu=cu_cpu, dest=dest, rows=cu[-1],
                     inner_h=t([h for h, _ in inner]), inner_blocks=t([b for _, b in inner]),
                     end_seqs=t([i for i, _ in ends]), end_blocks=t([b for _, b in ends]))


@dataclass(frozen=True, slots=True)
class _Reset:
    cu: torch.Tensor  # [P + 1] piece starts: the packed layout already has every piece contiguous
    cu_cpu: torch.Tensor
    first: torch.Tensor  # [n] each chunk's first piece
    ends: torch.Tensor  # [E] pieces that end on a boundary
    end_blocks: torch.Tensor
    last: torch.Tensor  # [n] each chunk's last piece
    last_ends: torch.Tensor  # [n] bool


def _reset_layout(batch: VarlenBatch) -> _Reset:
    dev, pieces = batch.device, batch.pieces
    first, last = [0] * batch.num_chunks, [0] * batch.num_chunks
    for j, p in enumerate(pieces):
        first[p.seq] = j if p.first else first[p.seq]
        last[p.seq] = j
    ends = [j for j, p in enumerate(pieces) if p.write_block >= 0]
    cu_cpu = torch.tensor([p.tok0 for p in pieces] + [batch.num_tokens], dtype=torch.long)

    def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(torch.tensor(x, dtype=dtype), dev)

    return _Reset(cu=to_device(cu_cpu, dev), cu_cpu=cu_cpu, first=t(first), ends=t(ends),
                  end_blocks=t([pieces[j].write_block for j in ends]), last=t(last),
                  last_ends=t([pieces[j].write_block >= 0 for j in last], torch.bool))


def core_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             batch: VarlenBatch, spec: MCSpec, state_pool: torch.Tensor, ckpt_pool: torch.Tensor,
             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """packed.py's `core_rounds` contract (o [T, HV, dv], states and checkpoints written), computed by
    fla with q, k, v and beta in `dtype` (the model's), g and the states in fp32, as fla's own layer
    feeds it. o comes back in `dtype`."""
    T, H, dk = q.shape
    scale = dk**-0.5
    qf, kf, vf, bf = (x.to(dtype) for x in (q, k, v, beta))
    gf = g.to(torch.promote_types(dtype, torch.float32))
    if spec.reset:
        lay = batch.memo("fla_reset", lambda: _reset_layout(batch))
        h0 = state_pool.new_zeros(len(batch.pieces), *state_pool.shape[1:])
        copy_rows(h0, lay.first, state_pool, batch.slots)
        o, final = chunk_final(qf[None], kf[None], vf[None], gf[None], bf[None], scale, h0, lay.cu, lay.cu_cpu)
        copy_rows(ckpt_pool, lay.end_blocks, final, lay.ends)
        state_pool[batch.slots] = torch.where(lay.last_ends[:, None, None, None], 0.0, final[lay.last]).to(
            state_pool.dtype)
        return o[0]
    bt = chunk_size(spec)
    lay = batch.memo(("fla_continue", bt), lambda: _continue_layout(batch, bt))
    if lay.dest is not None:
        qf, kf, vf, bf, gf = (_scatter(x, lay.dest, lay.rows) for x in (qf, kf, vf, bf, gf))
    h0 = state_pool[batch.slots]  # [n, HV, dv, dk], contiguous (fp32 on the GPU)
    o, h, final = chunk_with_states(qf[None], kf[None], vf[None], gf[None], bf[None], scale, h0, lay.cu,
                                    lay.cu_cpu, bt)
    copy_rows(ckpt_pool, lay.inner_blocks, h[0], lay.inner_h)  # one pass each, no gathered temporary
    copy_rows(ckpt_pool, lay.end_blocks, final, lay.end_seqs)
    copy_rows(state_pool, batch.slots, final)
    return o[0] if lay.dest is None else o[0, lay.dest]


def _scatter(x: torch.Tensor, dest: torch.Tensor, rows: int) -> torch.Tensor:
    """x [T, ...] at rows `dest` of a zero [rows, ...] tensor (the zeros are the padding)."""
    out = x.new_zeros(rows, *x.shape[1:])
    out[dest] = x
    return out
