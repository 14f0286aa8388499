"""Which launch config the Triton decode step runs: a table per card, written by a sweep on that card
(`benchmarks/kernel_sweep.py`, committed under kernels/decode/configs/), looked up by shape class,
kind of step and batch, and a fallback heuristic for every card, shape or kind the tables do not hold.

A config changes speed, never results (beyond fp32 rounding order), so a table can only be wrong about
time. Lookup keys (docs/KERNELS.md, "Launch configs"):
- shape class `G{HV/H}-dk{dk}-dv{dv}`: what one program's work depends on (H only multiplies programs);
- kind: `none`, `residual`, `ssc2` / `ssc4` / `ssc8` (SSC's k rounded up; k > 8 uses ssc8) and `grm`
  (`soup` runs as grm);
- pairs = B * HV, the (row, v-head) pairs of the step (grid size / tiles per pair): the entry of the
  smallest swept pairs count >= the step's, else of the largest.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("none", "residual", "ssc2", "ssc4", "ssc8", "grm")


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch choices of the Triton decode step.

    block_v: rows of dv per program (the state tile is [block_v, dk]); 0 = pick by shape.
    num_warps: warps per tile program; 0 = pick by tile size.
    tiles_per_program: dv tiles one program updates in turn (amortises its gates, norms and, with
        two_pass=False, its routing over more state; fewer programs in flight).
    heads_per_program: v-heads of one q/k head (HV = G H) one program updates in turn, so that the
        q/k head's vectors, key sum and (one-pass) routing are read and computed once per group;
        the kernel uses gcd(heads_per_program, G).
    two_pass: ssc/grm route in a separate launch per (row, q/k head) instead of in every program.
    num_stages: how deep Triton pipelines grm's loop over the cached checkpoints (1 = not at all).
    prefetch: issue the row's slot-independent loads (position, q, k, v, gates) beside the slot's and
        the key sum beside the state tile, so that a program waits on two dependent loads (slot, then
        state) instead of three or four: a fixed latency per program that small batches feel.
        Off in tables written before it existed.
    """

    block_v: int = 0
    num_warps: int = 0
    tiles_per_program: int = 1
    heads_per_program: int = 1
    two_pass: bool = False
    router_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False

    def __str__(self) -> str:
        return (f"bv{self.block_v or 'auto'} w{self.num_warps or 'auto'} t{self.tiles_per_program} "
                f"g{self.heads_per_program} {'2-pass' if self.two_pass else '1-pass'} s{self.num_stages}"
                + (" pf" if self.prefetch else ""))

    def __post_init__(self) -> None:
        for name in ("tiles_per_program", "heads_per_program", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_v < 0 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two (or 0 = by shape), got {self.block_v}")
        for name in ("num_warps", "router_warps"):
            w = getattr(self, name)
            if w < 0 or w & (w - 1) or w > 16:
                raise ValueError(f"{name} must be a power of two <= 16, got {w}")


def fallback_config(dk: int, dv: int, routed: bool) -> KernelConfig:
    """What runs where no table entry applies: tiles of ~1-2K fp32 elements per warp (FlashInfer and
    fla use 8 dv rows at dk=128), one tile and one v-head per program, routed aggregations routed once
    per (row, q/k head) in their own pass (the two-pass config was the best k=4 one on the H200 at
    B=256, 0.94 of copy)."""
    bk = _pow2_at_least(dk)
    bv = max(1, min(_pow2_at_least(dv), 2048 // bk, 16))
    return KernelConfig(block_v=bv, num_warps=1 if bv * bk <= 1024 else 2, two_pass=routed)


def shape_class(H: int, HV: int, dk: int, dv: int) -> str:
    return f"G{HV // H}-dk{dk}-dv{dv}"


def kind_of(aggregation: str, top_k: int) -> str:
    if aggregation == "ssc":
        return "ssc2" if top_k <= 2 else "ssc4" if top_k <= 4 else "ssc8"
    return "grm" if aggregation == "soup" else aggregation


@dataclass(frozen=True)
class Entry:
    """The swept winner for one (shape class, kind, pairs); `ms` and `of_copy` are what it measured
    (graph replay) and `swept` says at which B and H, for the reader."""

    shape: str
    kind: str
    pairs: int
    config: KernelConfig
    ms: float | None = None
    of_copy: float | None = None
    swept: str = ""


@dataclass(frozen=True)
class ConfigTable:
    card: str  # torch.cuda.get_device_name() of the card it was swept on
    entries: tuple[Entry, ...]
    source: str = ""  # how it was made (script, date, versions)
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[Entry]] = {}
        for e in self.entries:
            if e.kind not in KINDS:
                raise ValueError(f"table entry kind must be one of {KINDS}, got {e.kind!r}")
            index.setdefault((e.shape, e.kind), []).append(e)
        for es in index.values():
            es.sort(key=lambda e: e.pairs)
        object.__setattr__(self, "_index", index)

    def get(self, shape: str, kind: str, pairs: int) -> KernelConfig | None:
        es = self._index.get((shape, kind))
        if not es:
            return None
        return next((e for e in es if e.pairs >= pairs), es[-1]).config

    @classmethod
    def read(cls, path: str | Path) -> ConfigTable:
        d = json.loads(Path(path).read_text())
        entries = tuple(Entry(**{**e, "config": KernelConfig(**e["config"])}) for e in d["entries"])
        return cls(d["card"], entries, d.get("source", ""))

    def write(self, path: str | Path) -> None:
        """JSON, one entry a line (a table diff then reads entry by entry)."""
        rows = ",\n".join("  " + json.dumps({**asdict(e), "config": asdict(e.config)}) for e in self.entries)
        head = json.dumps(dict(card=self.card, source=self.source))[:-1]
        Path(path).write_text(f'{head}, "entries": [\n{rows}\n]}}\n')


_IN_USE: dict[str, ConfigTable] = {}


def use_table(path: str | Path) -> ConfigTable:
    """Make the table at `path` the one for its card in this process (before the committed one):
    how a benchmark runs a fresh sweep's table."""
    table = ConfigTable.read(path)
    _IN_USE[table.card] = table
    return table


@functools.cache
def committed_tables() -> dict[str, ConfigTable]:
    tables = [ConfigTable.read(p) for p in sorted(CONFIG_DIR.glob("*.json"))]
    return {t.card: t for t in tables}


def table_for(card: str) -> ConfigTable | None:
    return _IN_USE.get(card) or committed_tables().get(card)


INTERPRETER = "interpreter"  # the "card" of the Triton interpreter on CPU (no committed table: the fallback)


@functools.cache
def card_of(device: torch.device) -> str:
    """The card's name as the tables key it: torch.cuda.get_device_name, or INTERPRETER off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else INTERPRETER


def choose_config(card: str, H: int, HV: int, dk: int, dv: int, aggregation: str, top_k: int,
                  B: int) -> KernelConfig:
    """The table entry of this step on `card`, else `fallback_config`."""
    table = table_for(card)
    hit = table.get(shape_class(H, HV, dk, dv), kind_of(aggregation, top_k), B * HV) if table else None
    return hit or fallback_config(dk, dv, routed=aggregation in ("ssc", "grm", "soup"))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))
