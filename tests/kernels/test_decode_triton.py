"""The Triton decode step against the torch path (one step, every pool compared) and against the fp64
token-by-token reference (many steps), at odd shapes: dk=24, dv=40, HV=2H; holes, rows with 0..k
cached and k > cached, boundary rows, padded rows, mixed positions, per-row k, reset and continue,
query and learned routers, allow_neg_eigval; outputs and every pool entry that must not be read
poisoned with NaN. Runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py), natively on one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from mcserve.kernels.decode import DecodeBatch, LayerMemory, get_decode_path  # noqa: E402
from mcserve.kernels.decode.tuning import KernelConfig  # noqa: E402
from mcserve.kernels.gates import core_inputs  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from mcserve.kernels.reference import reference_mc_gdn  # noqa: E402
from tests.kernels.decode_cases import Case, Row, make_case, poison_unselected  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(H=2, HV=4, dk=24, dv=40)
C = 4
ROWS = [
    Row(position=5 * C + 1, slot=4, table=(3, -1, 7, 8, 9, 10, 20)),  # 4 cached + a hole; 10, 20 beyond the segment
    Row(position=1, slot=0, table=()),  # nothing cached yet
    Row(position=3 * C - 1, slot=2, table=(11, 12), write_block=13),  # boundary: writes block 13
    Row(position=2 * C + 2, slot=-1, table=(14, 15)),  # padded
    Row(position=C + 2, slot=5, table=(16,)),  # k > cached
]


def run(path: str, case: Case, spec: MCSpec, config: KernelConfig | None = None, monkeypatch=None) -> torch.Tensor:
    opts = {} if config is None else {"config": config}
    fn = get_decode_path(path, **opts)
    if monkeypatch is not None:  # every buffer the wrapper allocates starts as NaN: unwritten outputs show
        empty = torch.empty
        monkeypatch.setattr(torch, "empty", lambda *s, **kw: empty(*s, **kw).fill_(float("nan"))
                            if kw.get("dtype", torch.float32).is_floating_point else empty(*s, **kw).fill_(-7))
    try:
        return fn(*case.inputs, spec=spec, batch=case.batch, memory=case.memory,
                  allow_neg_eigval=case.allow_neg_eigval).cpu()
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def assert_memory_close(got: LayerMemory, want: LayerMemory) -> None:
    """Pools equal up to fp32 rounding order; bf16 checkpoints up to one rounding flip. NaN stays NaN:
    a path that wrote into an entry it must not touch fails here."""
    for name in ("state", "key_sum", "ckpt_key", "utility"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), atol=2e-5, rtol=1e-4,
                                   equal_nan=True, msg=name)
    torch.testing.assert_close(got.ckpt.cpu().float(), want.ckpt.float(), atol=1e-6, rtol=2**-7, equal_nan=True,
                               msg="ckpt")
    # a new checkpoint's rounding flip (one bf16 ulp of an element < 2) shows in the sum unscaled
    torch.testing.assert_close(got.ckpt_sum.cpu(), want.ckpt_sum, atol=2**-7, rtol=1e-4, equal_nan=True,
                               msg="ckpt_sum")


CASES = [  # aggregation, two_pass, learned router, allow_neg_eigval, state_init, per-row k
    ("none", False, False, True, "continue", None),
    ("residual", False, True, False, "reset", None),
    ("ssc", False, True, False, "continue", [2, 1, 2, 2, 1]),
    ("ssc", True, False, True, "reset", None),
    ("grm", False, False, False, "reset", None),
    ("grm", True, True, True, "continue", None),
    ("soup", True, False, False, "continue", None),
]


@pytest.mark.parametrize("agg,two_pass,learned,neg,init,top_k", CASES)
def test_step_matches_torch_path(agg, two_pass, learned, neg, init, top_k, monkeypatch) -> None:
    spec = MCSpec(agg, C, top_k=2, state_init=init)
    case = make_case(spec, ROWS, **SHAPE, seed=len(agg) + 10 * two_pass, learned=learned, allow_neg_eigval=neg,
                     top_k=top_k)
    if agg == "ssc":
        assert poison_unselected(case, spec) > 0
    mine, ref = case.clone(DEVICE), case.clone()
    y = run("triton", mine, spec, KernelConfig(block_v=64, num_warps=2, two_pass=two_pass), monkeypatch)
    y_ref = run("torch", ref, spec)
    assert torch.isfinite(y).all() and torch.all(y[3] == 0)  # the padded row's output is zero
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    assert_memory_close(mine.memory, ref.memory)
    if spec.reads_cache:  # the router weights reached the utility, only for blocks that were read
        gained = (mine.memory.utility.cpu() - case.memory.utility).abs() > 0
        assert gained.any() and not gained[[10, 13, 14, 15, 20]].any()


@pytest.mark.parametrize("agg,two_pass,tiles,heads", [
    ("ssc", False, 1, 1), ("ssc", False, 2, 1), ("grm", True, 2, 1), ("ssc", False, 2, 2), ("residual", False, 1, 2),
    ("grm", True, 1, 2)])
def test_partial_dv_tiles(agg: str, two_pass: bool, tiles: int, heads: int) -> None:
    """dv=40 in tiles of 16 (the last one partial; with 2 tiles per program the second group has one
    tile past dv): several programs per v-head share each (row, head)'s key sum, which the last of
    them (by ticket) writes when routing runs in every program. heads=2: one program updates both
    v-heads of its q/k head (HV = 2H), so a q/k head's programs are fewer and each routes once."""
    spec = MCSpec(agg, C, top_k=3)
    case = make_case(spec, [ROWS[0], ROWS[2], ROWS[3]], **SHAPE, seed=3 + heads, learned=False)
    mine, ref = case.clone(DEVICE), case.clone()
    cfg = KernelConfig(block_v=16, num_warps=1, tiles_per_program=tiles, heads_per_program=heads, two_pass=two_pass)
    for _ in range(2 if tiles * heads == 1 or (agg == "ssc" and heads == 2) else 1):
        # a second launch finds the tickets back at zero
        y = run("triton", mine, spec, cfg)
        y_ref = run("torch", ref, spec)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
        assert_memory_close(mine.memory, ref.memory)
        # next token: the boundary row is in its next segment (its new block not in the table: a hole)
        ref.batch = replace(ref.batch, positions=ref.batch.positions + 1, write_blocks=torch.full((3,), -1))
        mine.batch = replace(ref.batch, **{f: getattr(ref.batch, f).to(DEVICE) for f in ("positions", "write_blocks")})


PREFETCH_CASES = [  # aggregation, config, learned router, state_init, per-row k
    ("none", KernelConfig(block_v=8, num_warps=1, prefetch=True), False, "continue", None),
    ("none", KernelConfig(block_v=16, num_warps=1, tiles_per_program=2, heads_per_program=2, prefetch=True), True,
     "reset", None),
    ("residual", KernelConfig(block_v=16, num_warps=1, heads_per_program=2, prefetch=True), False, "continue", None),
    ("ssc", KernelConfig(block_v=16, num_warps=1, tiles_per_program=2, prefetch=True), True, "continue",
     [2, 1, 2, 2, 1]),
    ("ssc", KernelConfig(block_v=8, num_warps=1, two_pass=True, prefetch=True), False, "reset", None),
    ("grm", KernelConfig(block_v=16, num_warps=1, heads_per_program=2, prefetch=True), True, "continue", None),
    ("soup", KernelConfig(block_v=32, num_warps=2, two_pass=True, prefetch=True), False, "reset", None),
]


@pytest.mark.parametrize("agg,cfg,learned,init,top_k", PREFETCH_CASES, ids=lambda x: str(x).replace(" ", "_"))
def test_prefetch_variant_matches_torch_path(agg, cfg, learned, init, top_k, monkeypatch) -> None:
    """The prefetching prologue (the row's inputs loaded before the padded-row branch, the key sum
    beside the state tile) in small dv tiles (dv=40 in 8s, 16s or 32s, the last two partial), with
    several tiles or both v-heads of a q/k head per program: two consecutive steps against the torch
    path, every row kind of ROWS, unselected checkpoints and every pool entry no row owns poisoned,
    the outputs NaN-initialised. The second step finds one-pass routing's tickets back at zero and
    the boundary row in its next segment, reading the checkpoint the first step wrote."""
    spec = MCSpec(agg, C, top_k=2, state_init=init)
    case = make_case(spec, ROWS, **SHAPE, seed=20 + len(agg) + cfg.block_v, learned=learned, top_k=top_k)
    if agg == "ssc":
        assert poison_unselected(case, spec) > 0
    mine, ref = case.clone(DEVICE), case.clone()
    for step in range(2):
        y = run("triton", mine, spec, cfg, monkeypatch if step == 0 else None)
        y_ref = run("torch", ref, spec)
        assert torch.isfinite(y).all() and torch.all(y[3] == 0)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
        assert_memory_close(mine.memory, ref.memory)
        # next token: the boundary row is in its next segment, its new block 13 in its table as the runner puts it
        table = ref.batch.block_table.clone()
        table[2, 2] = 13
        ref.batch = replace(ref.batch, positions=ref.batch.positions + 1, write_blocks=torch.full((5,), -1),
                            block_table=table)
        mine.batch = replace(mine.batch, **{f: getattr(ref.batch, f).to(DEVICE)
                                            for f in ("positions", "write_blocks", "block_table")})
    if spec.reads_cache:
        gained = (mine.memory.utility.cpu() - case.memory.utility).abs() > 0
        assert gained.any() and not gained[[10, 14, 15, 20]].any()
        assert gained[13] or agg == "ssc"  # read in the second step (by all but a top-k that passes it over)


def test_ties_go_to_the_lower_entry() -> None:
    """Identical segment keys score identically; SSC (k=1) picks the lower table entry, as kernels/router.py."""
    spec = MCSpec("ssc", C, top_k=1)
    rows = [Row(position=4 * C + 1, slot=1, table=(5, 6, 7, 8))]
    case = make_case(spec, rows, H=1, HV=2, dk=24, dv=40, seed=4)
    u = case.inputs[5][0, 0]
    case.memory.ckpt_key[6] = case.memory.ckpt_key[8] = u / u.norm()  # the best key, twice
    mine, ref = case.clone(DEVICE), case.clone()
    run("triton", mine, spec, KernelConfig(block_v=64))
    run("torch", ref, spec)
    gained = mine.memory.utility.cpu() - case.memory.utility
    assert gained[6] > 0 and gained[[5, 7, 8]].abs().max() == 0
    assert_memory_close(mine.memory, ref.memory)


def test_errors_name_the_bad_input() -> None:
    spec = MCSpec("residual", C)
    case = make_case(spec, ROWS, **SHAPE, seed=5)
    fn = get_decode_path("triton")
    bad = [
        (dict(inputs=case.inputs[:1] + (case.inputs[1][..., :5],) + case.inputs[2:]), "k_raw must have shape"),
        (dict(memory=LayerMemory(case.memory.state.double(), *list(vars_of(case.memory))[1:])), "float32 state"),
        (dict(memory=LayerMemory(*list(vars_of(case.memory))[:4])), "needs memory.ckpt_sum"),
        (dict(memory=LayerMemory(torch.zeros(6, 4, 40, 48)[..., ::2], *list(vars_of(case.memory))[1:])), "packed"),
        (dict(batch=DecodeBatch(case.batch.positions.float(), case.batch.slots, case.batch.block_table,
                                case.batch.write_blocks)), "positions must be an integer"),
    ]
    for change, msg in bad:
        c = Case(**{**vars(case), **change})
        with pytest.raises(ValueError, match=msg):
            fn(*c.inputs, spec=spec, batch=c.batch, memory=c.memory)
    with pytest.raises(ValueError, match="decode path must be one of"):
        get_decode_path("cuda")


def vars_of(m: LayerMemory) -> tuple:
    return (m.state, m.key_sum, m.ckpt, m.ckpt_key, m.ckpt_sum, m.utility)


@pytest.mark.parametrize("agg,two_pass,init,learned", [("ssc", True, "reset", False), ("grm", False, "continue", True),
                                                       ("residual", False, "continue", False)])
def test_steps_match_fp64_reference(agg: str, two_pass: bool, init: str, learned: bool) -> None:
    """Sequences started at different steps decode token by token through the pools (fp32 checkpoints),
    a padded row among them; every output against the fp64 reference of each whole sequence."""
    H, HV, dk, dv, seg = 1, 2, 24, 40, 3
    spec = MCSpec(agg, seg, top_k=2, state_init=init)
    lens, starts = [11, 8, 5], [0, 2, 5]
    gen = torch.Generator().manual_seed(7)
    raw = [tuple(torch.randn(T, *s, generator=gen) for s in [(H, dk), (H, dk), (HV, dv), (HV,), (HV,), (H, dk)])
           for T in lens]
    A_log, dt_bias = torch.randn(HV, generator=gen) * 0.5, torch.randn(HV, generator=gen)
    refs = []
    for x in raw:
        xs = core_inputs(*(t.double() for t in x[:5]), x[5].double() if learned else None, A_log.double(),
                         dt_bias.double(), False, torch.float64)
        state, ks = torch.zeros(HV, dv, dk, dtype=torch.float64), torch.zeros(H, dk, dtype=torch.float64)
        refs.append(reference_mc_gdn(*xs, spec, 0, state, ks, [], []))
    n_slots, n_blocks = 4, 12
    mem = LayerMemory(torch.zeros(n_slots, HV, dv, dk), torch.zeros(n_slots, H, dk),
                      torch.full((n_blocks, HV, dv, dk), float("nan")), torch.full((n_blocks, H, dk), float("nan")),
                      torch.zeros(n_slots, HV, dv, dk), torch.zeros(n_blocks))
    mem = LayerMemory(*(t.to(DEVICE) for t in vars_of(mem)))
    slots, tables, outs, free = [3, 0, 2], [[], [], []], [[], [], []], iter(range(n_blocks))
    fn = get_decode_path("triton", config=KernelConfig(block_v=64, two_pass=two_pass))
    for step in range(max(s + T for s, T in zip(starts, lens, strict=True))):
        live = [r for r in range(3) if starts[r] <= step < starts[r] + lens[r]]
        rows = live[:1] + [-1] + live[1:]  # a padded row in the middle
        pos = [step - starts[r] if r >= 0 else 0 for r in rows]
        writes = [next(free) if r >= 0 and p % seg == seg - 1 else -1 for r, p in zip(rows, pos, strict=True)]
        width = max(len(tables[r]) for r in live) + 1
        table = [tables[r] + [-1] * (width - len(tables[r])) if r >= 0 else [-1] * width for r in rows]
        batch = DecodeBatch(torch.tensor(pos), torch.tensor([slots[r] if r >= 0 else -1 for r in rows]),
                            torch.tensor(table), torch.tensor(writes))
        batch = DecodeBatch(*(t.to(DEVICE) for t in (batch.positions, batch.slots, batch.block_table,
                                                     batch.write_blocks)))
        x = [torch.stack([raw[r][i][p] if r >= 0 else raw[0][i][0] for r, p in zip(rows, pos, strict=True)])
             for i in range(6)]
        y = fn(*(t.to(DEVICE) for t in x[:5]), x[5].to(DEVICE) if learned else None, A_log.to(DEVICE),
               dt_bias.to(DEVICE), spec=spec, batch=batch, memory=mem).cpu()
        assert torch.all(y[1] == 0)
        for i, (r, w) in enumerate(zip(rows, writes, strict=True)):
            if r >= 0:
                outs[r].append(y[i])
                if w >= 0:
                    tables[r].append(w)
    for r in range(3):
        got = torch.stack(outs[r]).double()
        assert float((got - refs[r]).abs().max() / refs[r].abs().max()) < 2e-6, r
