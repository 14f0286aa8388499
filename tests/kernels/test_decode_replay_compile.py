"""The replay decode kernel compiles for an H200 (sm_90) without a GPU, through Triton's own ptxas, as
tests/kernels/test_decode_triton_compile.py checks the existing kernel: what the interpreter cannot
check (types across the flush branch, constexpr use, register pressure). Real sizes (shape a, and b's
layer with grouped v-heads), W = 16; no local-memory spills. Compiled in a fresh process without
TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from mcserve.kernels.decode import DecodeBatch, LayerMemory  # noqa: E402
from mcserve.kernels.decode.replay import ReplayLog, plan_replay  # noqa: E402
from mcserve.kernels.decode.tuning import KernelConfig  # noqa: E402
from mcserve.kernels.mc_spec import MCSpec  # noqa: E402
from tests.kernels.test_decode_triton_compile import BIN, resource_usage  # noqa: E402

VARIANTS = {  # aggregation, config, (H, HV, dk, dv)
    "ssc-a-4-tiles": ("ssc", KernelConfig(block_v=8, num_warps=1, tiles_per_program=4), (16, 16, 128, 128)),
    "none-b-grouped": ("none", KernelConfig(block_v=8, num_warps=2, tiles_per_program=2), (3, 6, 256, 512)),
}


def launches(agg: str, cfg: KernelConfig, H: int, HV: int, dk: int, dv: int, B: int = 64, N: int = 64):
    """The launches of one real-size step, planned on meta tensors (nothing allocated)."""
    m = torch.device("meta")

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=m)

    bf, ids = torch.bfloat16, torch.long
    x = (t(B, H, dk, dtype=bf), t(B, H, dk, dtype=bf), t(B, HV, dv, dtype=bf), t(B, HV, dtype=bf), t(B, HV, dtype=bf),
         None, t(HV), t(HV))
    mem = LayerMemory(t(B, HV, dv, dk), t(B, H, dk), t(1000, HV, dv, dk, dtype=bf), t(1000, H, dk), None, t(1000))
    log = ReplayLog(t(B, H, 15, dk), t(B, HV, 15, dv), t(B, HV, 15, 2), t(B, dtype=torch.int32))
    batch = DecodeBatch(t(B, dtype=ids), t(B, dtype=ids), t(B, N, dtype=ids), t(B, dtype=ids), top_k_max=4)
    return plan_replay(x, spec=MCSpec(agg, 256, top_k=4), batch=batch, memory=mem, log=log, config=cfg)[1]


def check(agg: str, cfg: KernelConfig, shape: tuple, out: Path) -> list[dict]:
    return resource_usage(launches(agg, cfg, *shape), out)


@pytest.mark.skipif(shutil.which(str(BIN / "ptxas")) is None, reason="no ptxas in the Triton wheel")
def test_replay_compiles_for_h200_in_registers(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == set(VARIANTS)
    for name, rows in result.items():
        assert len(rows) == (2 if VARIANTS[name][0] == "ssc" else 1), (name, rows)
        for r in rows:
            assert r["spill"] == 0 and r["stack"] == 0, (name, r)


if __name__ == "__main__":
    print(json.dumps({name: check(agg, cfg, shape, Path(sys.argv[1])) for name, (agg, cfg, shape) in VARIANTS.items()}))
