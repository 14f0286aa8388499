"""The RESULTS.md tables from the runs in this folder: median over runs of each run's median step,
fastest step of all runs, per mode."""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
HEAD = ("| batch | ckpts per row | before: sched+runner ms, median | fastest | after: median | fastest "
        "| before/after, median | before: alone, median | after: alone, median "
        "| before: engine step, median | after: engine step, median |")


def main() -> None:
    for mode in ("full", "default"):
        runs = {s: [json.loads(Path(f).read_text())["rows"] for f in sorted(glob.glob(f"{HERE}/{s}-{mode}-*.json"))]
                for s in ("before", "after")}
        print(f"\n{mode}: {len(runs['before'])} + {len(runs['after'])} runs\n\n{HEAD}\n" + "|---:" * 11 + "|")
        for j, row in enumerate(runs["before"][0]):
            med = {(s, k): statistics.median(r[j][k] for r in runs[s]) for s in runs
                   for k in ("sched_runner_ms", "alone_ms", "engine_step_ms")}
            fast = {s: min(r[j]["sched_runner_ms_min"] for r in runs[s]) for s in runs}
            b, a = med["before", "sched_runner_ms"], med["after", "sched_runner_ms"]
            print(f"| {row['batch']} | {row['ckpts_per_row']} | {b:.2f} | {fast['before']:.2f} | {a:.2f} | "
                  f"{fast['after']:.2f} | {b / a:.2f}x | {med['before', 'alone_ms']:.2f} | "
                  f"{med['after', 'alone_ms']:.2f} | {med['before', 'engine_step_ms']:.2f} | "
                  f"{med['after', 'engine_step_ms']:.2f} |")


if __name__ == "__main__":
    main()
