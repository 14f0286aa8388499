"""The decode step's launch-config tables (kernels/decode/tuning.py): every committed entry is a valid
config that gives the torch path's results on a small case of its shape class (interpreter on CPU),
the lookup takes the right entry by kind and batch, and shapes, kinds and cards without an entry run
the fallback heuristic."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from mcserve.kernels.decode import tuning  # noqa: E402
from mcserve.kernels.decode.triton import plan_decode  # noqa: E402
from mcserve.kernels.decode.tuning import ConfigTable, Entry, KernelConfig, choose_config, fallback_config  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from tests.kernels.decode_cases import Row, make_case  # noqa: E402
from tests.kernels.test_decode_triton import DEVICE, assert_memory_close, run  # noqa: E402

C = 4
ROWS = [Row(position=3 * C + 1, slot=1, table=(3, -1, 5)),  # 2 cached + a hole
        Row(position=2 * C - 1, slot=0, table=(6,), write_block=7),  # boundary
        Row(position=C, slot=-1, table=(8,))]  # padded
AGG = {"none": ("none", 1), "residual": ("residual", 1), "ssc2": ("ssc", 2), "ssc4": ("ssc", 3), "ssc8": ("ssc", 5),
       "grm": ("grm", 1)}


def committed_entries() -> list[tuple[str, Entry]]:
    return [(card, e) for card, t in tuning.committed_tables().items() for e in t.entries]


def test_committed_tables_are_valid() -> None:
    """Each file reads back (its configs pass KernelConfig's checks), names a card, holds one entry per
    (shape class, kind, pairs), and every entry is what the lookup returns for its own key."""
    files = sorted(tuning.CONFIG_DIR.glob("*.json"))
    assert files, "no committed config table"
    for path in files:
        table = ConfigTable.read(path)
        assert table.card and table.source, path
        keys = [(e.shape, e.kind, e.pairs) for e in table.entries]
        assert len(keys) == len(set(keys)), path
        for e in table.entries:
            assert re.fullmatch(r"G\d+-dk\d+-dv\d+", e.shape) and e.pairs > 0, e
            assert table.get(e.shape, e.kind, e.pairs) == e.config
        assert json.loads(path.read_text())["card"] == table.card


def _case_for(entry: Entry):
    """A small random case of the entry's shape class: G from the class, dk and dv small and odd."""
    G = int(entry.shape.split("-")[0][1:])
    agg, k = AGG[entry.kind]
    spec = MCSpec(agg, C, top_k=k)
    return spec, make_case(spec, ROWS, H=1, HV=G, dk=12, dv=20, seed=entry.pairs % 97, learned=False, n_blocks=10)


def _semantics(entry: Entry) -> tuple:
    """What changes the interpreter's work: on CPU configs that differ only in warps or pipeline depth
    run the same programs (the GPU runs every entry)."""
    c = entry.config
    if DEVICE == "cuda":
        return entry.shape, entry.kind, c
    bv = min(c.block_v, 32)
    tiles = min(c.tiles_per_program, -(-20 // bv))
    return entry.shape, AGG[entry.kind][0], bv, tiles, c.heads_per_program, c.two_pass, c.prefetch


@pytest.mark.parametrize("card,entry", list({_semantics(e): (card, e) for card, e in committed_entries()}.values()),
                         ids=lambda x: str(x) if isinstance(x, str) else f"{x.shape}-{x.kind}-{x.pairs}")
def test_every_entry_matches_the_torch_path(card: str, entry: Entry, monkeypatch) -> None:
    spec, case = _case_for(entry)
    mine, ref = case.clone(DEVICE), case.clone()
    y = run("triton", mine, spec, entry.config, monkeypatch)
    y_ref = run("torch", ref, spec)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    assert_memory_close(mine.memory, ref.memory)


def _table(*entries: Entry, card: str = "Card X") -> ConfigTable:
    return ConfigTable(card, entries, "test")


def test_lookup_by_kind_and_batch() -> None:
    """The entry of the smallest swept pairs count >= the step's, else the largest; k rounds up to a
    swept k (beyond 8: ssc8); soup is grm; H scales the pairs count (B * HV)."""
    cfgs = [KernelConfig(8, 1), KernelConfig(16, 2), KernelConfig(32, 4), KernelConfig(16, 2, two_pass=True),
            KernelConfig(8, 1, two_pass=True, num_stages=3)]
    t = _table(Entry("G1-dk128-dv128", "none", 16, cfgs[0]), Entry("G1-dk128-dv128", "none", 1024, cfgs[1]),
               Entry("G1-dk128-dv128", "none", 4096, cfgs[2]), Entry("G1-dk128-dv128", "ssc8", 1024, cfgs[3]),
               Entry("G1-dk128-dv128", "grm", 1024, cfgs[4]))
    tuning._IN_USE["Card X"] = t
    try:
        def pick(agg: str, k: int, B: int, H: int = 16) -> KernelConfig:
            return choose_config("Card X", H, H, 128, 128, agg, k, B)

        assert [pick("none", 1, B) for B in (1, 2, 64, 65, 256, 512)] == [cfgs[0], cfgs[1], cfgs[1], cfgs[2],
                                                                          cfgs[2], cfgs[2]]
        assert pick("none", 1, 64, H=8) == cfgs[1] and pick("none", 1, 128, H=8) == cfgs[1]
        assert pick("ssc", 6, 8) == pick("ssc", 16, 512) == cfgs[3]
        assert pick("grm", 1, 64) == pick("soup", 1, 64) == cfgs[4]
        # kinds, shapes and cards the table does not hold: the fallback
        assert pick("ssc", 4, 64) == fallback_config(128, 128, routed=True)
        assert pick("residual", 1, 64) == fallback_config(128, 128, routed=False)
        assert choose_config("Card X", 16, 32, 128, 128, "none", 1, 64) == fallback_config(128, 128, routed=False)
        assert choose_config("Card Y", 16, 16, 128, 128, "none", 1, 64) == fallback_config(128, 128, routed=False)
    finally:
        del tuning._IN_USE["Card X"]


def test_the_wrapper_runs_the_chosen_config(tmp_path: Path, monkeypatch) -> None:
    """plan_decode without a config launches the table's entry for the step (use_table: a fresh sweep's
    file), and the fallback for a shape the table does not hold."""
    monkeypatch.setattr(tuning, "_IN_USE", {})
    entry = Entry("G2-dk12-dv20", "ssc2", 3 * 2, KernelConfig(4, 1, tiles_per_program=2, heads_per_program=2,
                                                               two_pass=False, prefetch=True))
    _table(entry, card=tuning.card_of(torch.device(DEVICE))).write(tmp_path / "t.json")
    assert tuning.use_table(tmp_path / "t.json").entries == (entry,)
    spec = _case_for(entry)[0]

    def launches(shape: str) -> list:
        c = _case_for(dataclasses.replace(entry, shape=shape))[1].clone(DEVICE)
        return plan_decode(c.inputs, spec=spec, batch=c.batch, memory=c.memory)[1]

    (launch,) = launches(entry.shape)
    got = launch.options
    assert (got["BV"], got["TPP"], got["HPP"], got["TWO_PASS"], got["PREFETCH"], launch.grid) == (
        4, 2, 2, False, True, (3 * 1 * 3,))
    router, tiles = launches("G1-dk12-dv20")  # no entry: the fallback, which routes in its own pass
    fb = fallback_config(12, 20, routed=True)
    assert fb.two_pass and (tiles.options["BV"], tiles.options["HPP"]) == (min(fb.block_v, 32), 1)
    assert not tiles.options["PREFETCH"]  # today's prologue until a sweep says otherwise


def test_entries_written_before_prefetch_read_as_without_it(tmp_path: Path) -> None:
    """A table line without the prefetch field (every table swept before it existed) runs today's
    prologue; one with it reads back as written."""
    e = Entry("G1-dk128-dv128", "none", 16, KernelConfig(4, 1, prefetch=True), 0.003, 0.2, "shape a B=1")
    _table(e).write(tmp_path / "t.json")
    assert ConfigTable.read(tmp_path / "t.json").entries == (e,)
    d = json.loads((tmp_path / "t.json").read_text())
    del d["entries"][0]["config"]["prefetch"]
    (tmp_path / "t.json").write_text(json.dumps(d))
    assert ConfigTable.read(tmp_path / "t.json").entries[0].config == KernelConfig(4, 1)
