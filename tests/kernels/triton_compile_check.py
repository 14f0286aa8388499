"""Compile the prefill's Triton kernels and the decode step's glue kernels for the H200 (sm_90) at the
served shapes (the 1.3b preset's for the decode glue), without a GPU.

Run by tests/kernels/test_triton_compile.py in a fresh process (the interpreter, which other tests
switch on, replaces the kernels by interpreted functions that cannot be compiled). Prints one line
per kernel variant: `name: ok` or `name: <error or ptxas report>`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H200 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
                   num_stages: int | None = None, aligned_counts: tuple[str, ...] = ()):
    """As the JIT specialises on the GPU: pointers (16-byte aligned, as torch allocates) and strides
    (multiples of 16 at the served shapes) carry tt.divisibility=16; counts do not, but those named in
    `aligned_counts` (a matmul's K at the served shapes: the JIT sees 2,048 and specialises on it)."""
    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name not in constexprs and (types[name].startswith("*") or name.startswith("s_")
                                                 or name in aligned_counts)}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    return triton.compile(ASTSource(fn, sig, constexprs, aligned), target=H200, options=options)


def strides(*names: str, t: str = "i32") -> dict[str, str]:
    return dict.fromkeys(names, t)


def check(kernel) -> None:
    """ptxas's report of the compiled kernel must show no spill stores."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(kernel.asm["ptx"])
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", out)]
    if not spills or max(spills):
        raise AssertionError(out)


def router_kernel(agg: int, nmax: int) -> None:
    from mcserve.kernels.prefill.triton import _router_kernel, launch_config

    cfg = launch_config(256, 512, nmax, fp32_dot=False)["router"]

    types = {"tiles": "*i32", "u": "*fp32", "k": "*fp32", "key_sum0": "*fp32", "table": "*i64", "top_k": "*i64",
             "key_pool": "*fp32", "gamma": "*fp32", "g_on": "*fp32", "weights": "*fp32", "n_tiles": "i32", "W": "i32",
             "C": "i32", **strides("s_ut", "s_uh", "s_kt", "s_kh", "s_sn", "s_sh", "s_pb", "s_ph", "s_gt", "s_gh",
                                   "s_ot")}
    check(compile_kernel(_router_kernel, types, dict(DK=256, BK=cfg["BK"], BT=cfg["BT"], NMAX=nmax, AGG=agg, KMAX=4,
                                                      PREV=3, HAS_WEIGHTS=True), cfg["num_warps"]))


def readout_kernel(ckpt: str, ieee: bool) -> None:
    from mcserve.kernels.prefill.triton import _readout_kernel, launch_config

    cfg = launch_config(256, 512, 16, fp32_dot=ieee)["readout"]

    types = {"tiles": "*i32", "q": f"*{ckpt}", "o": "*bf16", "gamma": "*fp32", "g_on": "*fp32", "table": "*i64",
             "ckpt": f"*{ckpt}", "y": "*bf16", "n_tiles": "i32", "W": "i32", "scale": "fp32",
             **strides("s_qt", "s_qh", "s_ot", "s_oh", "s_gt", "s_gh", "s_got", "s_ch", "s_cv", "s_yt", "s_yh"),
             "s_cb": "i64"}
    check(compile_kernel(_readout_kernel, types, dict(G=1, DK=256, DV=512, BK=cfg["BK"], BV=cfg["BV"], BT=cfg["BT"],
                                                       NMAX=16, IEEE=ieee), cfg["num_warps"]))


def conv_heads_kernel(copy32: bool) -> None:
    """At the 1.3b preset's shapes (6 heads, dk 256, dv 512), as conv_heads_triton launches it."""
    from mcserve.kernels.prefill.triton_conv import _conv_heads_kernel, launch_config

    cfg = launch_config(256)
    types = {"raw": "*bf16", "s_r": "i32", "prev": "*bf16", "s_pn": "i32", "s_pd": "i32", "tok_seq": "*i32",
             "tok_off": "*i32", "w": "*fp32", "b": "*fp32", "q": "*bf16", "k": "*bf16", "v": "*bf16", "q32": "*fp32",
             "k32": "*fp32", "T": "i32", "KD": "i32", "VD": "i32"}
    check(compile_kernel(_conv_heads_kernel, types, dict(W=4, H=6, DK=256, BT=cfg["BT"], BD=cfg["BD"], HAS_BIAS=False,
                                                         COPY32=copy32), cfg["num_warps"]))


def keep_windows_kernel() -> None:
    """The conv windows into the pools at the 1.3b preset's conv_dim (6,144), W-1 = 3."""
    from mcserve.kernels.prefill.triton_conv import _keep_windows_kernel

    types = {"raw": "*bf16", "prev": "*bf16", "win_tok": "*i1", "win_row": "*i64", "win_col": "*i64",
             "win_seq": "*i64", "slots": "*i64", "blocks": "*i64", "st": "*bf16", "ck": "*bf16", "n": "i32", "D": "i32",
             **strides("s_r", "s_pn", "s_pd", "s_sn", "s_sd", "s_cn", "s_cd")}
    check(compile_kernel(_keep_windows_kernel, types, dict(W1=3, BD=1024)))


def copy_rows_kernel(src: str, dst: str) -> None:
    """fla's states (fp32) and per-chunk states (bf16) into the pools."""
    from mcserve.kernels.prefill.triton_rows import BLOCK, _copy_rows_kernel

    types = {"dst": f"*{dst}", "dst_rows": "*i64", "src": f"*{src}", "src_rows": "*i64", "N": "i32",
             **strides("s_d", "s_s", t="i64")}
    check(compile_kernel(_copy_rows_kernel, types, dict(BLOCK=BLOCK, SRC_ROWS=True), 8))


def grouped_kernel(ckpt: str, ieee: bool) -> None:
    from mcserve.kernels.prefill.triton_grouped import _grouped_kernel

    types = {"tile_group": "*i64", "tile_first": "*i64", "group_end": "*i64", "tok": "*i64", "gam": "*fp32",
             "q": f"*{ckpt}", "table": "*i64", "ckpt": f"*{ckpt}", "acc": "*fp32", "n_groups": "i32", "W": "i32",
             "scale": "fp32", **strides("s_qt", "s_qh", "s_ch", "s_cv", "s_at", "s_ah"), "s_cb": "i64"}
    check(compile_kernel(_grouped_kernel, types, dict(H=6, G=1, DK=256, DV=512, BK=32 if ieee else 64, BV=64, BT=64,
                                                       IEEE=ieee), 8 if ieee else 4))


def segment_keys_kernel() -> None:
    """k in bf16 at dk 256, fp32 pools (the state dtype on the GPU), 256-token segments."""
    from mcserve.kernels.prefill.triton_keys import _segment_keys_kernel

    types = {"k": "*bf16", "meta": "*i32", "n_pieces": "i32", "key_sum0": "*fp32", "slot_keys": "*fp32",
             "ckpt_keys": "*fp32", "C": "i32",
             **strides("s_kt", "s_kh", "s_0n", "s_0h", "s_sn", "s_sh", "s_cb", "s_ch")}
    check(compile_kernel(_segment_keys_kernel, types, dict(DK=256, MAXLEN=256, BT=32, BK=256), 8))


def norm_kernels(bd: int, gate: int) -> None:
    from mcserve.kernels.triton_norms import _rmsnorm_kernel, _swiglu_kernel

    types = {"x": "*bf16", "w": "*bf16", "gate": "*bf16", "y": "*bf16", "R": "i32", "D": "i32", "eps": "fp32",
             "GH": "i32", **strides("s_x", "s_g", "s_y")}
    check(compile_kernel(_rmsnorm_kernel, types, dict(BR=max(1, 512 // bd), BD=bd, GATE=gate)))
    check(compile_kernel(_swiglu_kernel, {"gate": "*bf16", "up": "*bf16", "y": "*bf16", "N": "i32"}, dict(BN=1024)))


def step_kernels() -> None:
    """kernels/triton_step.py's row gather and conv step (with the checkpoint write) at the 1.3b
    preset's conv dim."""
    from mcserve.kernels.triton_step import _conv_step_kernel, _gather_kernel

    types = {"x": "*bf16", "state": "*bf16", "slots": "*i64", "w": "*bf16", "bias": "*bf16", "y": "*bf16", "D": "i32",
             "ckpt": "*bf16", "writes": "*i64", **strides("s_x", "s_sb", "s_y", "s_cb")}
    check(compile_kernel(_conv_step_kernel, types, dict(W1=3, WP=4, BD=256, HAS_BIAS=False, HAS_CKPT=True)))
    i64 = ("order", "positions", "tokens", "slots", "top_k", "table", "tok_o", "pos_o", "slot_o", "k_o", "table_o",
           "write_o")
    types = {**dict.fromkeys(i64, "*i64"), "utility": "*fp32", "s_t": "i32", "width": "i32", "C": "i32",
             "last": "i32", "scratch": "i32"}
    check(compile_kernel(_gather_kernel, types, dict(BW=8, HAS_UTIL=True), num_warps=1))


def mm_kernels() -> None:
    """kernels/triton_mm.py with every config the committed H200 table picks, at the batch block it
    picks it for, split-K (fp32 atomics) or not."""
    from mcserve.kernels.triton_mm import _mm_kernel, block_m, table_for

    table = table_for("NVIDIA H200")
    picked = set()
    for (N, K), rows in table.rows.items():
        for M, _, _ in rows:
            for split in (False, True):
                cfg = table.choose(N, K, M, torch.bfloat16, split)
                if cfg is not None:
                    picked.add((cfg, block_m(M)))
    assert picked, "the H200 table picks no Triton config"
    for cfg, bm in sorted(picked, key=str):
        atomic = cfg.split > 1
        types = {"x": "*bf16", "w": "*bf16", "y": "*fp32" if atomic else "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "k_steps": "i32", **strides("s_x", "s_w", "s_y")}
        check(compile_kernel(_mm_kernel, types, dict(N_IT=0, BM=bm, BN=cfg.bn, BK=cfg.bk, ATOMIC=atomic,
                                                     INTERPRET=False, IEEE=False, STAGES=cfg.stages),
                             num_warps=cfg.warps, num_stages=cfg.stages, aligned_counts=("K", "N")))


VARIANTS = {
    "decode matmuls": (mm_kernels, ()),
    **{f"router agg={a} nmax={n}": (router_kernel, (a, n)) for a, n in [(2, 16), (2, 32), (1, 64), (0, 16), (2, 256)]},
    "readout bf16": (readout_kernel, ("bf16", False)),
    "readout fp32": (readout_kernel, ("fp32", True)),
    **{f"conv heads copy32={c}": (conv_heads_kernel, (c,)) for c in (False, True)},
    "segment keys": (segment_keys_kernel, ()),
    "keep windows": (keep_windows_kernel, ()),
    **{f"copy rows {a}->{b}": (copy_rows_kernel, (a, b)) for a, b in [("fp32", "fp32"), ("bf16", "bf16"),
                                                                      ("fp32", "bf16")]},
    "grouped bf16": (grouped_kernel, ("bf16", False)),
    "grouped fp32": (grouped_kernel, ("fp32", True)),
    **{f"norm D={d} gate={g}": (norm_kernels, (d, g)) for d, g in [(2048, 0), (512, 1), (512, 2)]},
    "step glue": (step_kernels, ()),
}


def main() -> None:
    for name, (fn, args) in VARIANTS.items():
        try:
            fn(*args)
            print(f"{name}: ok", flush=True)
        except Exception as e:  # reported to the test, which fails on it
            print(f"{name}: {type(e).__name__}: {e}".replace("\n", " | "), flush=True)


if __name__ == "__main__":
    sys.exit(main())
