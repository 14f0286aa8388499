"""Batched single-token decode step of one Gated DeltaNet + Memory Caching layer core, pure torch.

Every sequence of the batch keeps its online state in a slot of a state pool and its cached
memories in blocks of a checkpoint pool, read through its row of a block table. This is the
shape of the engine's step; it is the oracle that any Triton decode kernel is tested against.
"""

from __future__ import annotations

import torch

from mcserve.kernels.decode.contract import DecodeBatch, LayerMemory, check_decode_inputs
from mcserve.kernels.gates import core_inputs
from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.router import chosen_mask, mc_gamma, select_mask, ssc_order


def torch_decode_step(
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    u_raw: torch.Tensor | None,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    spec: MCSpec,
    batch: DecodeBatch,
    memory: LayerMemory,
    allow_neg_eigval: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The decode step of `contract.DecodeFn` on `decode_mc_gdn`: gates and norms from the
    projections, padded rows left out, and the same utility and checkpoint-sum updates as the Triton
    path. Residual reads its checkpoints through the table here (an independent check of the sum).
    Syncs with the device when padded rows exist and `batch.live_rows` is not given."""
    check_decode_inputs(q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias, spec, batch, memory)
    dt = memory.state.dtype
    x = core_inputs(q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias, allow_neg_eigval, dt)
    B, HV, dv = v.shape
    live = batch.live_rows if batch.live_rows is not None else (batch.slots >= 0).nonzero().squeeze(-1)
    rows = None if live.numel() == B else live  # None: every row is live, no gather

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or rows is None else t[rows]

    table, writes = pick(batch.block_table).long(), pick(batch.write_blocks).long()
    write_rows = batch.write_rows if rows is None else None
    if write_rows is None:
        write_rows = (writes >= 0).nonzero().squeeze(-1)
    slots = pick(batch.slots).long()
    y_live, w = decode_mc_gdn(*(pick(t) for t in x), spec, pick(batch.positions).long(), slots, memory.state,
                              memory.key_sum, memory.ckpt, memory.ckpt_key, table, writes, pick(batch.top_k),
                              write_rows, batch.top_k_max)
    if memory.utility is not None and w is not None:
        memory.utility.index_add_(0, table.clamp_min(0).reshape(-1),
                                  torch.where(table >= 0, w, 0.0).reshape(-1).to(memory.utility.dtype))
    if memory.ckpt_sum is not None and write_rows.numel():
        memory.ckpt_sum[slots[write_rows]] += memory.ckpt[writes[write_rows]].to(memory.ckpt_sum.dtype)
    y = y_live if rows is None else torch.zeros(B, HV, dv, dtype=dt, device=v.device).index_copy_(0, rows, y_live)
    return y.to(out_dtype or dt)


def decode_mc_gdn(
    q: torch.Tensor,  # [B, H, dk] L2-normalised, not scaled
    k: torch.Tensor,  # [B, H, dk]
    v: torch.Tensor,  # [B, HV, dv]
    g: torch.Tensor,  # [B, HV]
    beta: torch.Tensor,  # [B, HV]
    u: torch.Tensor,  # [B, H, dk]
    spec: MCSpec,
    positions: torch.Tensor,  # [B] long: position of this token
    slots: torch.Tensor,  # [B] long
    state_pool: torch.Tensor,  # [slots, HV, dv, dk] fp32, updated in place
    key_sum_pool: torch.Tensor,  # [slots, H, dk] fp32, updated in place
    ckpt_pool: torch.Tensor,  # [blocks, HV, dv, dk] (a layer's view), written at boundaries
    ckpt_key_pool: torch.Tensor,  # [blocks, H, dk]
    block_table: torch.Tensor,  # [B, N] long, block of segment i or -1 (dropped / padding)
    write_blocks: torch.Tensor,  # [B] long: block for this token's checkpoint, -1 if not a boundary
    top_k: torch.Tensor | None = None,  # [B] long: per-row SSC k (None: spec.top_k)
    write_rows: torch.Tensor | None = None,  # rows with write_blocks >= 0, if the caller knows them
    top_k_max: int | None = None,  # max(top_k), if the caller knows it
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (y [B, HV, dv], router weight per table entry [B, N] summed over heads, or None).

    `write_rows` and `top_k_max` are what the host already knows from the plan; passing them keeps
    the step free of device->host syncs (otherwise they are derived on the device, with a sync)."""
    B, H, dk = q.shape
    HV = v.shape[1]
    G = HV // H
    C = spec.segment_size
    dt = state_pool.dtype
    qs = (q.to(dt) * dk**-0.5).repeat_interleave(G, dim=1)  # [B, HV, dk]
    kv = k.to(dt).repeat_interleave(G, dim=1)

    s = state_pool[slots] * torch.exp(g.to(dt))[..., None, None]  # [B, HV, dv, dk]
    err = v.to(dt) - (s @ kv[..., None]).squeeze(-1)
    s = s + (beta.to(dt)[..., None] * err)[..., None] * kv[:, :, None, :]
    o = (s @ qs[..., None]).squeeze(-1)  # [B, HV, dv]
    key_sum = key_sum_pool[slots] + k.to(dt)

    weights = None
    if spec.reads_cache and block_table.shape[1] > 0:
        o, weights = _read_cache(o, qs, u.to(dt), key_sum, positions, spec, ckpt_pool, ckpt_key_pool,
                                 block_table, top_k, G, top_k_max)

    boundary = (positions % C) == C - 1
    keep = ~(boundary & spec.reset)
    state_pool[slots] = s * keep[:, None, None, None].to(dt)
    key_sum_pool[slots] = key_sum * (~boundary)[:, None, None].to(dt)
    rows = (write_blocks >= 0).nonzero().squeeze(-1) if write_rows is None else write_rows
    if rows.numel():
        dst = write_blocks[rows]
        ckpt_pool[dst] = s[rows].to(ckpt_pool.dtype)
        ckpt_key_pool[dst] = (key_sum[rows] / C).to(ckpt_key_pool.dtype)
    return o, weights


def _read_cache(
    o: torch.Tensor,  # [B, HV, dv]
    qs: torch.Tensor,  # [B, HV, dk]
    u: torch.Tensor,  # [B, H, dk]
    key_sum: torch.Tensor,  # [B, H, dk] including this token
    positions: torch.Tensor,
    spec: MCSpec,
    ckpt_pool: torch.Tensor,
    ckpt_key_pool: torch.Tensor,
    block_table: torch.Tensor,
    top_k: torch.Tensor | None,
    G: int,
    top_k_max: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, HV, dv = o.shape
    H, dk = u.shape[1], u.shape[2]
    N = block_table.shape[1]
    dt = o.dtype
    seg = positions // spec.segment_size
    valid = (block_table >= 0) & (torch.arange(N, device=o.device)[None, :] < seg[:, None])  # [B, N]
    table = block_table.clamp_min(0)

    if spec.aggregation == "residual":
        cq = torch.einsum("bnvdk,bvk->bnvd", ckpt_pool[table].to(dt), qs)
        cq = torch.where(valid[:, :, None, None], cq, 0.0)
        return o + cq.sum(1), valid.to(dt) * H

    count = (positions % spec.segment_size + 1).to(dt)
    r_online = (u * key_sum).sum(-1) / count[:, None]  # [B, H]
    r_cached = torch.einsum("bhk,bnhk->bhn", u, ckpt_key_pool[table].to(dt))
    if spec.aggregation == "ssc":
        order = ssc_order(r_cached, valid)  # one sort serves the selection and the gather below
        chosen = select_mask(r_cached, valid, spec.top_k if top_k is None else top_k, order)
    else:
        chosen = chosen_mask(spec, r_cached, valid)
    g_on, g_c = mc_gamma(r_online, r_cached, chosen)  # [B, H], [B, H, N]
    y = g_on.repeat_interleave(G, dim=1)[..., None] * o

    if spec.aggregation == "ssc":
        # read only the selected checkpoints: per (row, head) the k best table entries
        if top_k_max is None:
            top_k_max = spec.top_k if top_k is None else int(top_k.max())
        kmax = min(N, top_k_max)
        pick = order[..., :kmax]  # [B, H, k]
        w = g_c.gather(-1, pick)  # [B, H, k]; 0 where not chosen
        blocks = table.gather(1, pick.reshape(B, -1)).view(B, H, kmax)
        per_head = ckpt_pool.view(ckpt_pool.shape[0], H, G, dv, dk)
        mem = per_head[blocks, torch.arange(H, device=o.device)[None, :, None]]  # [B, H, k, G, dv, dk]
        cq = torch.einsum("bhjgdk,bhgk->bhjgd", mem.to(dt), qs.view(B, H, G, dk))
        cq = torch.where((w > 0)[..., None, None], cq, 0.0)  # unwritten blocks may hold NaN
        y = y + torch.einsum("bhj,bhjgd->bhgd", w, cq).reshape(B, HV, dv)
    else:
        cq = torch.einsum("bnvdk,bvk->bnvd", ckpt_pool[table].to(dt), qs)
        cq = torch.where(valid[:, :, None, None], cq, 0.0)
        y = y + torch.einsum("bvn,bnvd->bvd", g_c.repeat_interleave(G, dim=1), cq)
    return y, g_c.sum(1)
