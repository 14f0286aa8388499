"""Which delta-rule core a GPU training run should use, from tests/gpu/fla_backward_check.py's JSON.

    python3 scripts/mctrain/pick_core.py fb.json      # prints train.py arguments, e.g. `--backend torch`

A core qualifies when its `check chat` row passed (fla's kernel under bf16 autocast against the fp32
torch core, train.py's own bar) and its `train` row ran in graph mode without an error. fla is picked
over the torch core only when it is at least MIN_GAIN faster, since the torch core is the one every
earlier run used; of fla's two backward modes the faster qualifying one wins. A missing or unreadable
file picks the torch core. train.py re-runs its check before training either way (`--backend auto`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIN_GAIN = 1.10


def pick(result: dict) -> tuple[list[str], str]:
    """(train.py arguments, why) for a fla_backward_check result."""
    rows = result.get("rows", [])
    passed = {r["mode"] for r in rows if r.get("row") == "check" and r.get("case") == "chat" and r.get("passes")}
    speed = {}
    for r in rows:
        if r.get("row") == "train" and "error" not in r and r.get("mode_after") == "graph":
            speed[r["mode"] or "torch"] = r["tok_per_s"]
    torch_speed = speed.get("torch")
    fla = {m: s for m, s in speed.items() if m != "torch" and m in passed}
    if not fla:
        return ["--backend", "torch"], f"no fla mode passed and trained (passed {sorted(passed)}, ran {sorted(speed)})"
    mode, best = max(fla.items(), key=lambda kv: kv[1])
    if torch_speed is not None and best < MIN_GAIN * torch_speed:
        return ["--backend", "torch"], f"fla+{mode} {best:.0f} tok/s is < {MIN_GAIN}x torch {torch_speed:.0f}"
    return ["--backend", "auto", "--fla-backward", mode], f"fla+{mode} {best:.0f} tok/s vs torch {torch_speed}"


def main(argv: list[str]) -> None:
    try:
        result = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError, IndexError) as e:
        args, why = ["--backend", "torch"], f"no check result ({e})"
    else:
        args, why = pick(result)
    print(why, file=sys.stderr)
    print(" ".join(args))


if __name__ == "__main__":
    main(sys.argv[1:])
