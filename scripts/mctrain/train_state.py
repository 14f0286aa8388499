"""A training run's resumable state: weights, AdamW state, step, RNG states and the trainer's own extras.

`--save-state PATH` writes it when a run stops early (--max-seconds, --pause-at), so that a run cut by
one GPU command's time limit continues in the next (`--resume PATH`, the same other arguments): the
batches, schedule and curriculum go on exactly as in an uncut run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# arguments that must be the same in the resumed run: they fix the data, model and schedule
SAME_ON_RESUME = ("size", "aggregation", "segment_size", "top_k", "seq_len", "batch_size", "lr", "warmup",
                  "min_lr_ratio", "weight_decay", "seed", "decay_init", "steps", "state_init")


def add_state_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--save-state", help="write the resumable state here when the run stops early")
    ap.add_argument("--resume", help="continue the run whose --save-state this is")
    ap.add_argument("--pause-at", type=int, help="stop early (as --max-seconds would) after this many steps")


def save_state(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, args: dict,
               extra: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, args=args, extra=extra,
                 torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a reader never sees half a file


def load_state(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, args: dict) -> tuple[int, dict]:
    """Load into `model` and `opt` (in place); returns (steps done, the trainer's extras). The
    optimizer keeps this run's lr object and fused / capturable flags (the saved run may have been
    on another device)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    diff = {k: (state["args"].get(k), args.get(k)) for k in SAME_ON_RESUME if state["args"].get(k) != args.get(k)}
    if diff:
        raise SystemExit(f"--resume {path}: these arguments differ from the saved run's (saved, now): {diff}")
    model.load_state_dict(state["model"])
    keep = [{k: g[k] for k in ("lr", "fused", "capturable", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, kept in zip(opt.param_groups, keep, strict=True):
        group.update(kept)
        if group.get("fused") or group.get("capturable"):  # these keep the step count on the param's device
            for p in group["params"]:
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"] = opt.state[p]["step"].to(p.device, torch.float32)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["extra"]
