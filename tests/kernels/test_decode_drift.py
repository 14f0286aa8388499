"""Drift: many decode steps of one sequence through the Triton kernel (fp32 state, bf16 checkpoints)
against the fp64 recurrence (fp64 state and checkpoints), SSC with slow decay so the state keeps a
long memory.

The bound, per step t and output row v (u = 2^-24, the fp32 unit roundoff):
- the state. One row's update s' = e^g s (I - beta k k^T) + beta v k^T is non-expansive (||k|| = 1,
  0 <= beta <= 2, g <= 0), so the fp32 rounding committed at each step adds up and never grows: each
  step commits at most d_t = 2 (dk + 8) u (||s_t|| + |v_t|) per row (a length-dk dot product, a few
  elementwise roundings, the fp32 gates and norms), and ||S_t - S_ref,t||_row <= e_S(t) = sum_{tau<=t} d_tau.
- the checkpoints. Rounding to bf16 (to nearest) moves each element by at most 2^-9 of itself, on
  top of the state error at the time it was cached: ||C~_i - C_i||_row <= 2^-9 ||C_i|| + e_S(t_i).
- the router. Scores come from fp32 keys and means: |dr| <= (C + dk + 8) u ||u||; the softmax moves
  each weight by at most 2 |dr|.
So |y_t - y_ref,t|_inf <= (e_S(t) + 2^-9 (1 + 2^-8) max_i ||C_i||_row + (dk + 2) u max_M ||M||_row) ||q||
                          + 2 |dr| (k + 1) max_M |M q|_inf,
and the final state is within e_S(T). The bound is worst case (errors of random sign mostly cancel):
at 2,000 steps the output reaches 0.2 of it, the state 3e-5. It does not see how a checkpoint is
rounded (truncating it instead reaches 0.6 of the bound at 300 steps), so every checkpoint is also
checked exactly: right after its boundary step it must equal the kernel's fp32 state rounded to bf16
by torch (to nearest even), bit for bit.

CI runs a small shape under the Triton interpreter (300 steps: 2,000 interpreted steps cost minutes
of CPU); on a GPU it runs 2,000 steps, and at a real layer size as a script:
    python tests/kernels/test_decode_drift.py --real --steps 2000
"""

from __future__ import annotations

import argparse
import os

import torch

from mcserve.kernels.decode import DecodeBatch, LayerMemory, get_decode_path
from mcserve.kernels.gates import core_inputs
from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.reference import reference_mc_gdn

U = 2.0**-24
SMALL = dict(H=1, HV=1, dk=16, dv=16, C=32, k=2)
REAL = dict(H=16, HV=16, dk=128, dv=128, C=256, k=4)


def drift(H: int, HV: int, dk: int, dv: int, C: int, k: int, steps: int, device: str, seed: int = 0) -> dict:
    """Runs `steps` tokens; returns the worst error/bound ratios (must stay <= 1) and the raw errors."""
    gen = torch.Generator().manual_seed(seed)
    spec = MCSpec("ssc", C, top_k=k)
    raw = [torch.randn(steps, *s, generator=gen) for s in [(H, dk), (H, dk), (HV, dv), (HV,), (HV,), (H, dk)]]
    raw[4] -= 1.0  # beta ~ 0.27 on average
    A_log, dt_bias = torch.full((HV,), -4.0), torch.full((HV,), -1.0)  # g ~ -0.002 .. -0.013: a long memory
    q, kk, v, g, beta, u = core_inputs(*(t.double() for t in raw[:5]), raw[5].double(), A_log.double(),
                                       dt_bias.double(), False, torch.float64)

    n_blocks = steps // C + 1
    mem = LayerMemory(torch.zeros(1, HV, dv, dk, device=device), torch.zeros(1, H, dk, device=device),
                      torch.full((n_blocks, HV, dv, dk), float("nan"), dtype=torch.bfloat16, device=device),
                      torch.full((n_blocks, H, dk), float("nan"), device=device))
    fn = get_decode_path("triton")
    S_ref = torch.zeros(HV, dv, dk, dtype=torch.float64)
    ks_ref = torch.zeros(H, dk, dtype=torch.float64)
    ckpts: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    dev = [t.to(device) for t in raw] + [A_log.to(device), dt_bias.to(device)]
    e_S = 0.0
    c_rows: list[float] = []  # max row norm of each cached checkpoint
    worst, worst_err = 0.0, 0.0
    no_writes = torch.zeros(0, dtype=torch.long, device=device)
    inexact_ckpts: list[int] = []  # blocks that are not the state rounded to bf16
    for t in range(steps):
        boundary = t % C == C - 1
        n_cached = len(ckpts)
        batch = DecodeBatch(torch.tensor([t], device=device), torch.zeros(1, dtype=torch.long, device=device),
                            torch.arange(n_cached, device=device)[None], torch.tensor([n_cached if boundary else -1],
                                                                                      device=device),
                            top_k_max=k, write_rows=None if boundary else no_writes)
        y = fn(dev[0][t:t + 1], dev[1][t:t + 1], dev[2][t:t + 1], dev[3][t:t + 1], dev[4][t:t + 1],
               dev[5][t:t + 1], dev[6], dev[7], spec=spec, batch=batch, memory=mem)[0].double().cpu()
        row_s = float(S_ref.norm(dim=-1).max())
        y_ref = reference_mc_gdn(q[t:t + 1], kk[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], u[t:t + 1], spec, t,
                                 S_ref, ks_ref, ckpts, keys)[0]
        e_S += 2 * (dk + 8) * U * (max(row_s, float(S_ref.norm(dim=-1).max())) + float(v[t].abs().max()))
        qs = q[t] * dk**-0.5  # [H, dk]
        mems = [S_ref] + ckpts[:n_cached]
        if len(ckpts) > len(c_rows):
            c_rows.append(float(ckpts[-1].norm(dim=-1).max()))
        c_row = max(c_rows[:n_cached], default=0.0)
        m_row = max([float(S_ref.norm(dim=-1).max()), c_row])
        mq = max(float(torch.einsum("hvk,hk->hv", m.view(H, HV // H * dv, dk), qs).abs().max()) for m in mems)
        dr = (C + dk + 8) * U * float(u[t].norm(dim=-1).max())
        bound = (e_S + 2**-9 * (1 + 2**-8) * c_row + (dk + 2) * U * m_row) * float(qs.norm(dim=-1).max()) \
            + 2 * dr * (k + 1) * mq
        if boundary and not torch.equal(mem.ckpt[n_cached], mem.state[0].to(torch.bfloat16)):
            inexact_ckpts.append(n_cached)
        err = float((y - y_ref).abs().max())
        worst, worst_err = max(worst, err / bound), max(worst_err, err)
    state_err = float((mem.state[0].double().cpu() - S_ref).norm(dim=-1).max())
    return dict(worst_y_ratio=worst, worst_y_err=worst_err, state_ratio=state_err / e_S, state_err=state_err,
                e_S=e_S, checkpoints=len(ckpts), inexact_checkpoints=inexact_ckpts)


def test_drift_stays_within_the_fp32_and_bf16_bound() -> None:
    import pytest  # noqa: PLC0415 (the script also runs where pytest is not installed)

    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = int(os.environ.get("MCSERVE_DRIFT_STEPS", 2000 if device == "cuda" else 300))
    out = drift(**SMALL, steps=steps, device=device)
    assert out["checkpoints"] >= 4, out
    assert out["worst_y_ratio"] <= 1.0, out
    assert out["state_ratio"] <= 1.0, out
    assert out["inexact_checkpoints"] == [], out


def main() -> None:
    ap = argparse.ArgumentParser(description="decode-kernel drift against the fp64 recurrence")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--real", action="store_true", help=f"the real layer size {REAL} instead of {SMALL}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    out = drift(**(REAL if args.real else SMALL), steps=args.steps, device=args.device)
    print(out)
    if out["worst_y_ratio"] > 1.0 or out["state_ratio"] > 1.0 or out["inexact_checkpoints"]:
        raise SystemExit("drift beyond the bound")


if __name__ == "__main__":
    main()
