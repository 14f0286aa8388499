"""Random decode steps over pools, as the runner would hand them to a decode path: raw projection
outputs, a batch of rows at mixed positions (holes, padded rows, boundary rows) and one layer's
memory, with every pool entry that must not be read poisoned with NaN."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mcserve.kernels.decode import DecodeBatch, LayerMemory
from mcserve.kernels.decode.residual import rebuild_ckpt_sum
from mcserve.kernels.gates import core_inputs
from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.router import select_mask

NAN = float("nan")


@dataclass(frozen=True)
class Row:
    position: int
    slot: int  # -1: padded row
    table: tuple[int, ...]  # block per segment entry, -1 = hole; entries >= position // C point at poison
    write_block: int = -1


@dataclass
class Case:
    inputs: tuple  # q_raw, k_raw, v, a, b, u_raw, A_log, dt_bias
    batch: DecodeBatch
    memory: LayerMemory
    allow_neg_eigval: bool

    def clone(self, device: str | torch.device | None = None) -> Case:
        """A deep copy (pools and all), optionally on another device."""

        def cp(t):
            return None if t is None else t.clone() if device is None else t.to(device, copy=True)

        m, b = self.memory, self.batch
        mem = LayerMemory(*(cp(t) for t in (m.state, m.key_sum, m.ckpt, m.ckpt_key, m.ckpt_sum, m.utility)))
        batch = replace(b, **{f: cp(getattr(b, f)) for f in ("positions", "slots", "block_table", "write_blocks",
                                                              "top_k", "write_rows", "live_rows")})
        return Case(tuple(cp(t) for t in self.inputs), batch, mem, self.allow_neg_eigval)


def make_case(spec: MCSpec, rows: list[Row], *, H: int, HV: int, dk: int, dv: int, seed: int, learned: bool = True,
              allow_neg_eigval: bool = False, top_k: list[int] | None = None, n_slots: int = 6, n_blocks: int = 24,
              ckpt_dtype: torch.dtype = torch.bfloat16, width: int | None = None) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    B = len(rows)
    inputs = (rnd(B, H, dk), rnd(B, H, dk), rnd(B, HV, dv), rnd(B, HV), rnd(B, HV), rnd(B, H, dk) if learned else None,
              rnd(HV, scale=0.5), rnd(HV, scale=0.5))
    N = width if width is not None else max(len(r.table) for r in rows)
    table = torch.full((B, N), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        table[i, : len(r.table)] = torch.tensor(r.table, dtype=torch.long)

    # every pool entry starts poisoned; what a row may read gets real values below
    state = torch.full((n_slots, HV, dv, dk), NAN)
    key_sum = torch.full((n_slots, H, dk), NAN)
    ckpt = torch.full((n_blocks, HV, dv, dk), NAN, dtype=ckpt_dtype)
    ckpt_key = torch.full((n_blocks, H, dk), NAN)
    C = spec.segment_size
    for r in rows:
        if r.slot < 0:
            continue
        state[r.slot] = rnd(HV, dv, dk, scale=0.3)
        key_sum[r.slot] = rnd(H, dk, scale=0.5) * (r.position % C) ** 0.5
        for blk in r.table[: r.position // C]:
            if blk >= 0:
                ckpt[blk] = rnd(HV, dv, dk, scale=0.3).to(ckpt_dtype)
                ckpt_key[blk] = torch.nn.functional.normalize(rnd(H, dk), dim=-1)
    ckpt_sum = torch.full((n_slots, HV, dv, dk), NAN)
    for r in rows:
        if r.slot >= 0:
            rebuild_ckpt_sum(ckpt_sum[r.slot], ckpt, list(r.table[: r.position // C]))
    utility = rnd(n_blocks).abs()  # accumulated onto, not overwritten
    batch = DecodeBatch(
        positions=torch.tensor([r.position for r in rows]),
        slots=torch.tensor([r.slot for r in rows]),
        block_table=table,
        write_blocks=torch.tensor([r.write_block for r in rows]),
        top_k=None if top_k is None else torch.tensor(top_k),
        top_k_max=None if top_k is None else max(top_k),
    )
    memory = LayerMemory(state, key_sum, ckpt, ckpt_key, ckpt_sum, utility)
    return Case(inputs, batch, memory, allow_neg_eigval)


def poison_unselected(case: Case, spec: MCSpec) -> int:
    """For SSC: poison the checkpoints (not the keys) of the valid blocks no (row, head) selects, so that
    reading one shows up as NaN. Returns how many blocks were poisoned."""
    q, k, v, g, beta, u = core_inputs(*case.inputs, case.allow_neg_eigval, torch.float32)
    b, m = case.batch, case.memory
    seg = b.positions // spec.segment_size
    N = b.block_table.shape[1]
    valid = (b.block_table >= 0) & (torch.arange(N)[None, :] < seg[:, None]) & (b.slots[:, None] >= 0)
    keys = torch.nan_to_num(m.ckpt_key[b.block_table.clamp_min(0)])  # [B, N, H, dk]
    r = torch.einsum("bhk,bnhk->bhn", u, keys)
    chosen = select_mask(r, valid, spec.top_k if b.top_k is None else b.top_k).any(1)  # [B, N]
    keep = set(b.block_table[chosen].tolist())
    bad = {int(x) for x in b.block_table[valid]} - keep
    for blk in bad:
        m.ckpt[blk] = NAN
    return len(bad)
