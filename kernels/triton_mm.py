"""A matmul for the short, wide products of a decode step: y = x @ W^T for x [M, K] with M a decode
batch (1 to a few hundred rows) and W [N, K] a layer's weight, read once from HBM.

At these shapes the product is a stream of W: its time is W's bytes over the memory bandwidth, and
what loses time is a grid that does not fill the card in whole waves (N / BN tiles over 132 SMs) and
the reduction kernel a split-K GEMM launches after itself. Here a program computes a [BM, BN] tile of
y over one K-range of W (`split` ranges per tile, grid (N / BN, split, M / BM)); with split > 1 the
partial sums go to an fp32 output by atomic adds (the caller gets y zeroed and fp32: no second
kernel besides the zeroing, which is a memset in the step's graph), with split = 1 the tile is
stored in y's dtype as torch rounds it.

Whether this beats cuBLAS for a shape and batch is measured, not assumed: `benchmarks/decode_gemm.py`
times both on the card, per weight shape of the 1.3b preset and per batch, over weights cycled
through more memory than L2 holds, and its JSON, committed as `kernels/configs/matmul_<card>.json`,
is the table `MatmulTable` reads: for a product (N, K) at a batch of M rows it takes the measured
batch nearest above M and the fastest config there, and only when that config beat cuBLAS by
`MARGIN` (one run's noise); any other product, batch or card stays with cuBLAS. A config changes
speed and the summation order, never anything else.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MARGIN = 1.05  # a Triton config replaces cuBLAS only when measured at least this much faster
_NAME = re.compile(r"bn(\d+)_bk(\d+)_s(\d+)_w(\d+)_st(\d+)")


@dataclass(frozen=True, slots=True)
class MMConfig:
    """BN columns of y (rows of W) per program, BK of K per loop step, `split` K-ranges per tile."""

    bn: int = 64
    bk: int = 128
    split: int = 1
    warps: int = 4
    stages: int = 4

    def name(self) -> str:
        return f"bn{self.bn}_bk{self.bk}_s{self.split}_w{self.warps}_st{self.stages}"

    @staticmethod
    def parse(name: str) -> MMConfig:
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"not a matmul config name: {name!r}")
        return MMConfig(*(int(g) for g in m.groups()))


class MatmulTable:
    """Measured cuBLAS and Triton times per (N, K, M) on one card and dtype (decode_gemm.py's JSON;
    its weights are bf16 unless the data says `dtype`)."""

    def __init__(self, data: dict, source: str = "") -> None:
        self.card, self.source = data["device"], source
        self.dtype = getattr(torch, data.get("dtype", "bfloat16"))
        self.rows: dict[tuple[int, int], list[tuple[int, float, dict[str, float]]]] = {}
        for r in data["rows"]:
            timed = {k: v["ms"] for k, v in r["configs"].items() if "ms" in v}
            self.rows.setdefault((r["N"], r["K"]), []).append((r["M"], r["torch_ms"], timed))
        for v in self.rows.values():
            v.sort()

    def choose(self, N: int, K: int, M: int, dtype: torch.dtype, allow_split: bool) -> MMConfig | None:
        """The Triton config for y = x @ W^T (x [M, K], W [N, K]) or None for cuBLAS. allow_split: the
        caller takes an fp32 sum (split-K configs) instead of y in x's dtype."""
        if dtype != self.dtype:
            return None
        above = [r for r in self.rows.get((N, K), []) if r[0] >= M]
        if not above:
            return None
        _, torch_ms, timed = above[0]
        timed = {k: ms for k, ms in timed.items() if allow_split or MMConfig.parse(k).split == 1}
        if not timed:
            return None
        best = min(timed, key=timed.get)
        return MMConfig.parse(best) if torch_ms >= MARGIN * timed[best] else None


@functools.cache
def table_for(card: str) -> MatmulTable | None:
    """The committed table measured on `card` (torch.cuda.get_device_name), if any; MCSERVE_MATMUL_TABLE
    = a decode_gemm.json to use instead (a fresh sweep, before it is committed)."""
    override = os.environ.get("MCSERVE_MATMUL_TABLE")
    for path in [Path(override)] if override else sorted(CONFIG_DIR.glob("matmul_*.json")):
        data = json.loads(path.read_text())
        if data.get("device") == card:
            return MatmulTable(data, str(path.name))
    return None


@triton.jit
def _mm_kernel(x, s_x, w, s_w, y, s_y, M, N, K, k_steps,
               N_IT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr,
               INTERPRET: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    # a program's K range starts at a multiple of BK (k_steps steps of BK each), so the compiler knows
    # its loads are aligned and pipelines them (a start it cannot prove aligned: no cp.async, spills)
    k_lo = pid_k * k_steps * BK
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    # (the interpreter cannot loop to an argument: N_IT there)
    for i in tl.range(0, N_IT if INTERPRET else k_steps, num_stages=STAGES):
        rk = k_lo + i * BK + tl.arange(0, BK)
        km = rk < K  # only the last range runs past K
        xv = tl.load(x + rm[:, None].to(tl.int64) * s_x + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        # W's rows as stored (K contiguous: vector loads), transposed for the dot
        wv = tl.load(w + rn[:, None].to(tl.int64) * s_w + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        if INTERPRET:  # the interpreter's dot misreads bf16 operands: the same products in fp32
            xv, wv = xv.to(tl.float32), wv.to(tl.float32)
        if IEEE:  # fp32 operands: full fp32 products, not TF32 (the fp32 equivalence runs)
            acc += tl.dot(xv, tl.trans(wv), input_precision="ieee")
        else:
            acc += tl.dot(xv, tl.trans(wv))
    ptr = y + rm[:, None].to(tl.int64) * s_y + rn[None, :]
    om = mm[:, None] & nm[None, :]
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=om, sem="relaxed")
    else:
        tl.store(ptr, acc.to(y.dtype.element_ty), mask=om)


def block_m(M: int) -> int:
    """Rows of x per program: tl.dot wants at least 16; past 64 the grid gets an M dimension."""
    return min(64, max(16, triton.next_power_of_2(M)))


def mm(x: torch.Tensor, w: torch.Tensor, cfg: MMConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (rows may be strided, last dim contiguous), w [N, K] contiguous rows -> y [M, N]:
    x's dtype when cfg.split == 1, else fp32 (accumulated into `out` if given, which must be zeroed
    fp32 [M, N]; a zeroed one is allocated otherwise)."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1, (x.shape, x.stride(), w.shape, w.stride())
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    atomic = cfg.split > 1
    if out is None:
        out = (torch.zeros if atomic else torch.empty)(M, N, dtype=torch.float32 if atomic else x.dtype,
                                                       device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1, (out.shape, out.stride())
    assert out.dtype == (torch.float32 if atomic else x.dtype), out.dtype
    bm = block_m(M)
    k_steps = triton.cdiv(triton.cdiv(K, cfg.split), cfg.bk)  # BK steps per K range
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if M:
        grid = (triton.cdiv(N, cfg.bn), triton.cdiv(K, k_steps * cfg.bk), triton.cdiv(M, bm))
        _mm_kernel[grid](x, x.stride(0), w, w.stride(0), out, out.stride(0), M, N, K, k_steps,
                         N_IT=k_steps if interp else 0, BM=bm, BN=cfg.bn, BK=cfg.bk, ATOMIC=atomic,
                         INTERPRET=interp,
                         IEEE=x.dtype == torch.float32, STAGES=cfg.stages, num_warps=cfg.warps,
                         num_stages=cfg.stages)
    return out
