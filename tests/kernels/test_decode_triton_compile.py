"""The decode kernels compile for an H200 (sm_90) without a GPU, through Triton's own ptxas: what the
interpreter cannot check (types across branches, constexpr use, register pressure). Every variant
keeps its state and checkpoint tiles in registers (no local-memory spills) and loads them with
16-byte vector loads. Real sizes: H=16, dk=dv=128, 64 cached entries, bf16 checkpoints.

The compile runs in a fresh process without TRITON_INTERPRET (this session's kernels are interpreted)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mcserve.kernels.decode import DecodeBatch, LayerMemory  # noqa: E402
from mcserve.kernels.decode.triton import Launch, plan_decode  # noqa: E402
from mcserve.kernels.decode.tuning import KernelConfig  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32"}


def launches(agg: str, cfg: KernelConfig, B: int = 64, H: int = 16, HV: int = 16, d: int = 128, N: int = 64):
    """The launches of one real-size step, planned on meta tensors (nothing allocated)."""
    m = torch.device("meta")

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=m)

    bf = torch.bfloat16
    x = (t(B, H, d, dtype=bf), t(B, H, d, dtype=bf), t(B, HV, d, dtype=bf), t(B, HV, dtype=bf), t(B, HV, dtype=bf),
         None, t(HV), t(HV))
    mem = LayerMemory(t(B, HV, d, d), t(B, H, d), t(1000, HV, d, d, dtype=bf), t(1000, H, d),
                      t(B, HV, d, d) if agg == "residual" else None, t(1000))
    ids = torch.long
    batch = DecodeBatch(t(B, dtype=ids), t(B, dtype=ids), t(B, N, dtype=ids), t(B, dtype=ids), top_k_max=4)
    return plan_decode(x, spec=MCSpec(agg, 256, top_k=4), batch=batch, memory=mem, config=cfg)[1]


def compile_sm90(launch: Launch):
    """Compile as the launcher would specialise it: 16-byte aligned pointers, strides divisible by 16."""
    fn, values = launch.kernel, dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    values.update({k: v for k, v in launch.options.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        x = values[name]
        if param.is_constexpr or x is None:
            signature[name], constexprs[name] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            signature[name], attrs[(i,)] = "*" + TYPES[x.dtype], [["tt.divisibility", 16]]
        elif isinstance(x, int):
            signature[name] = "i32" if abs(x) < 2**31 else "i64"
            if x % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.options["num_warps"]})


def check(agg: str, cfg: KernelConfig, HV: int, out: Path) -> list[dict]:
    """Compile every launch of one variant; registers, spills and vector loads per kernel."""
    return resource_usage(launches(agg, cfg, HV=HV), out)


def resource_usage(step_launches: list[Launch], out: Path) -> list[dict]:
    """Compile each launch for sm_90; its registers, local memory (spills), stack and v4 loads."""
    rows = []
    for launch in step_launches:
        kernel = compile_sm90(launch)
        cubin = out / f"{launch.kernel.__name__}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        rows.append(dict(kernel=launch.kernel.__name__, regs=int(re.search(r"REG:(\d+)", usage).group(1)),
                         spill=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
                         stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                         v4_loads=len(re.findall(r"ld\.global(\.\w+)*\.v4", kernel.asm["ptx"]))))
    return rows


VARIANTS = {  # aggregation, config, HV (H = 16)
    "ssc-fused": ("ssc", KernelConfig(block_v=8, num_warps=1), 16),
    "grm-two-pass": ("grm", KernelConfig(block_v=16, num_warps=2, two_pass=True), 16),
    "none-2-tiles": ("none", KernelConfig(block_v=8, num_warps=1, tiles_per_program=2), 16),
    "ssc-fused-2-heads": ("ssc", KernelConfig(block_v=16, num_warps=2, heads_per_program=2), 32),
    "none-prefetch-small": ("none", KernelConfig(block_v=4, num_warps=1, prefetch=True), 16),
    "residual-prefetch-2-heads": ("residual", KernelConfig(block_v=8, num_warps=1, heads_per_program=2,
                                                           prefetch=True), 32),
    "ssc-fused-prefetch": ("ssc", KernelConfig(block_v=8, num_warps=1, prefetch=True), 16),
    "ssc-two-pass-prefetch": ("ssc", KernelConfig(block_v=4, num_warps=1, two_pass=True, prefetch=True), 16),
}


@pytest.mark.skipif(shutil.which(str(BIN / "ptxas")) is None, reason="no ptxas in the Triton wheel")
def test_compiles_for_h200_in_registers(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == set(VARIANTS)
    for name, rows in result.items():
        cfg = VARIANTS[name][1]
        for r in rows:
            assert r["spill"] == 0 and r["stack"] == 0, (name, r)  # tiles stay in registers
            if r["kernel"] == "_decode_kernel":  # 16-byte loads: 4 fp32 of the [bv, 128] tile's share per thread
                assert r["v4_loads"] >= cfg.block_v * 128 // (32 * cfg.num_warps * 4), (name, r)


if __name__ == "__main__":
    print(json.dumps({name: check(agg, cfg, HV, Path(sys.argv[1])) for name, (agg, cfg, HV) in VARIANTS.items()}))
