"""The replay decode step (kernels/decode/replay.py) against the torch path over many consecutive steps
from the same start, at odd shapes (dk=24, dv=40, HV=2H): rows at mixed positions that cross segment
boundaries at different log counts (C=6, W=4), a hole, table entries past the segment poisoned until
the row's own boundary write replaces them, a padded row, per-row k, reset and continue. Every step's
y is compared; a reader materialises two slots mid-run; after the last step every slot is
materialised and the states, key sums, checkpoints, segment keys and utilities compared. Slots no
row owns keep their (poisoned) log and count untouched. Runs under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mcserve.kernels.decode import DecodeBatch, LayerMemory, get_decode_path  # noqa: E402
from mcserve.kernels.decode.replay import ReplayLog, materialise, replay_decode_step  # noqa: E402
from mcserve.kernels.decode.tuning import KernelConfig  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from tests.kernels.decode_cases import NAN, Row, make_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(H=2, HV=4, dk=24, dv=40)
C, W = 6, 4
STEPS = 3 * W + 5
ROWS = [
    Row(position=5 * C + 1, slot=4, table=(3, -1, 7, 8, 9, 10, 20)),  # a hole; 10, 20 past the segment (poison)
    Row(position=1, slot=0, table=()),
    Row(position=3 * C - 1, slot=2, table=(11, 12)),  # ends its segment at the first step
    Row(position=2 * C + 2, slot=-1, table=(14, 15)),  # padded
    Row(position=C + 3, slot=5, table=(16,)),
]
OWNED, UNOWNED = [4, 0, 2, 5], [1, 3]
FIRST_NEW_BLOCK = 24  # make_case's pool holds 24 blocks; the boundary writes go above


def poisoned_log(n_slots: int) -> ReplayLog:
    """A log whose every entry is NaN; owned slots start empty, the others with a count of 2."""
    H, HV, dk, dv = SHAPE["H"], SHAPE["HV"], SHAPE["dk"], SHAPE["dv"]
    log = ReplayLog.empty(n_slots, H, HV, dk, dv, W, DEVICE)
    for t in (log.k, log.v, log.gb):
        t.fill_(NAN)
    log.count.fill_(2)
    log.count[OWNED] = 0
    return log


def fresh_inputs(gen: torch.Generator, B: int, learned: bool, A_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple:
    H, HV, dk, dv = SHAPE["H"], SHAPE["HV"], SHAPE["dk"], SHAPE["dv"]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return (rnd(B, H, dk), rnd(B, H, dk), rnd(B, HV, dv), rnd(B, HV), rnd(B, HV), rnd(B, H, dk) if learned else None,
            A_log, dt_bias)


def on(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy on DEVICE (never the same tensor: the two paths update their own pools)."""
    return None if t is None else t.to(DEVICE, copy=True)


def assert_pools_close(got: LayerMemory, want: LayerMemory) -> None:
    for name in ("state", "key_sum", "ckpt_key", "utility"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), atol=2e-5, rtol=1e-4,
                                   equal_nan=True, msg=name)
    torch.testing.assert_close(got.ckpt.cpu().float(), want.ckpt.float(), atol=1e-6, rtol=2**-7, equal_nan=True,
                               msg="ckpt")


CASES = [  # aggregation, config, learned router, allow_neg_eigval, state_init, per-row k
    ("none", KernelConfig(block_v=64, num_warps=2), False, True, "continue", None),
    ("ssc", KernelConfig(block_v=32, num_warps=1, tiles_per_program=2), True, False, "reset", [2, 1, 2, 2, 1]),
]


@pytest.mark.parametrize("agg,cfg,learned,neg,init,top_k", CASES, ids=lambda x: str(x).replace(" ", "_"))
def test_many_steps_match_torch_path(agg, cfg, learned, neg, init, top_k, monkeypatch) -> None:
    spec = MCSpec(agg, C, top_k=2, state_init=init)
    case = make_case(spec, ROWS, **SHAPE, seed=7 + len(agg), learned=learned, allow_neg_eigval=neg, top_k=top_k,
                     n_blocks=FIRST_NEW_BLOCK + 12, width=9)
    ref = case.clone()
    ref.memory = LayerMemory(*(getattr(ref.memory, f) for f in ("state", "key_sum", "ckpt", "ckpt_key")),
                             None, ref.memory.utility)
    m = ref.memory
    mine = LayerMemory(*(on(t) for t in (m.state, m.key_sum, m.ckpt, m.ckpt_key)), None, on(m.utility))
    log = poisoned_log(m.state.shape[0])
    torch_step = get_decode_path("torch")
    gen = torch.Generator().manual_seed(99)
    b0 = case.batch
    table, new_block = b0.block_table.clone(), FIRST_NEW_BLOCK
    live = b0.slots >= 0
    flushes = 0
    empty = torch.empty
    for step in range(STEPS):
        pos = b0.positions + step
        ends = live & (pos % C == C - 1)
        writes = torch.full_like(pos, -1)
        for r in ends.nonzero().flatten().tolist():
            writes[r], new_block = new_block, new_block + 1
        batch = DecodeBatch(pos, b0.slots, table.clone(), writes, b0.top_k, b0.top_k_max)
        x = fresh_inputs(gen, len(ROWS), learned, *case.inputs[6:])
        y_ref = torch_step(*x, spec=spec, batch=batch, memory=ref.memory, allow_neg_eigval=neg)
        counts = log.count.clone()
        # every buffer the wrapper allocates starts as NaN (ints as -7): unwritten outputs show
        monkeypatch.setattr(torch, "empty", lambda *s, **kw: empty(*s, **kw).fill_(
            NAN if kw.get("dtype", torch.float32).is_floating_point else -7))
        try:
            y = replay_decode_step(*(on(t) for t in x), spec=spec, memory=mine, log=log, allow_neg_eigval=neg,
                                   config=cfg, batch=DecodeBatch(*(on(t) for t in (
                                       batch.positions, batch.slots, batch.block_table, batch.write_blocks,
                                       batch.top_k)), batch.top_k_max))
        finally:
            monkeypatch.undo()
        assert torch.all(y[3] == 0)  # the padded row
        torch.testing.assert_close(y.cpu(), y_ref, atol=2e-5, rtol=1e-4, msg=f"y at step {step}")
        # the log rule: a row appends, or at W entries or a segment end empties its log
        for r, slot in enumerate(b0.slots.tolist()):
            if slot >= 0:
                flush = bool(ends[r]) or int(counts[slot]) + 1 >= W
                flushes += flush
                assert int(log.count[slot]) == (0 if flush else int(counts[slot]) + 1), (step, slot)
        for r in ends.nonzero().flatten().tolist():  # the runner puts the new checkpoint in the row's table
            table[r, int(pos[r]) // C] = writes[r]
        if step == W + 1:  # a reader of two slots mid-run: their states are then the online ones
            materialise(mine.state, log, torch.tensor([4, -1, 5], device=DEVICE))
            assert log.count[[4, 5]].tolist() == [0, 0]
            torch.testing.assert_close(mine.state[[4, 5]].cpu(), ref.memory.state[[4, 5]], atol=2e-5, rtol=1e-4)
    assert flushes > STEPS * len(OWNED) // W  # boundaries and full logs both flushed
    assert log.count[UNOWNED].tolist() == [2, 2] and torch.isnan(log.v[UNOWNED]).all()
    materialise(mine.state, log, torch.tensor(OWNED, device=DEVICE))
    assert_pools_close(mine, ref.memory)
    if spec.reads_cache:  # the router weights reached the utility, only for blocks that were read
        gained = (mine.utility.cpu() - case.memory.utility).abs() > 0
        assert gained.any() and not gained[[14, 15]].any()


def test_materialise_is_the_update_of_the_logged_steps() -> None:
    """materialise() applies count entries (and no more) of each slot's log as the GDN update
    S <- e^g S; S <- S + beta (v - S k) k^T, one q/k key for both of its v-heads."""
    H, HV, dk, dv = SHAPE["H"], SHAPE["HV"], SHAPE["dk"], SHAPE["dv"]
    gen = torch.Generator().manual_seed(3)
    state = torch.randn(3, HV, dv, dk, generator=gen, dtype=torch.float64).float()
    log = ReplayLog.empty(3, H, HV, dk, dv, W, "cpu")
    log.k.copy_(torch.nn.functional.normalize(torch.randn(log.k.shape, generator=gen), dim=-1))
    log.v.normal_(generator=gen)
    log.gb[..., 0] = -torch.rand(log.gb.shape[:-1], generator=gen)
    log.gb[..., 1] = torch.rand(log.gb.shape[:-1], generator=gen)
    log.count.copy_(torch.tensor([3, 0, 1], dtype=torch.int32))
    want = state.double().clone()
    for slot, n in enumerate([3, 0, 1]):
        for i in range(n):
            for hv in range(HV):
                kk, vv = log.k[slot, hv // 2, i].double(), log.v[slot, hv, i].double()
                g, beta = log.gb[slot, hv, i].double()
                want[slot, hv] *= torch.exp(g)
                want[slot, hv] += beta * torch.outer(vv - want[slot, hv] @ kk, kk)
    log.v[1].fill_(NAN)  # slot 1 holds no entries: never read
    materialise(state, log, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(state.double(), want, atol=1e-5, rtol=1e-5)
    assert log.count.tolist() == [0, 0, 0]


def test_errors_name_the_bad_input() -> None:
    spec = MCSpec("grm", C)
    case = make_case(spec, ROWS, **SHAPE, seed=5)
    log = ReplayLog.empty(6, 2, 4, 24, 40, W, "cpu")
    with pytest.raises(ValueError, match="serves aggregations"):
        replay_decode_step(*case.inputs, spec=spec, batch=case.batch, memory=case.memory, log=log)
    bad = ReplayLog(log.k[:, :, :, :5], log.v, log.gb, log.count)
    with pytest.raises(ValueError, match="log.k must be"):
        replay_decode_step(*case.inputs, spec=MCSpec("none", C), batch=case.batch, memory=case.memory, log=bad)
    with pytest.raises(ValueError, match="window must be >= 2"):
        ReplayLog.empty(6, 2, 4, 24, 40, 1, "cpu")
