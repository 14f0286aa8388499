"""`Scheduler.fast_decode` on and off on alternate steps of one benchmarks/host_overhead.py run (one
process, so the other jobs on the machine hit both alike): sched+runner per step, median and fastest.

    cd benchmarks && BK=256,64 OMP_NUM_THREADS=1 python results/cpu/host_overhead/fast-decode/toggle.py [--full-pool]
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
import host_overhead as ho  # noqa: E402

from mcserve.server.model.default import default_model_dir  # noqa: E402
from mcserve.server.text.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ho.STEPS = 160
    tok = Tokenizer.from_dir(default_model_dir())
    model = ho.micro_model(tok.vocab_size)
    timed, res = ho.timed, {True: [], False: []}

    def toggled(engine):
        spent, inner, n = timed(engine), engine.step, [0]

        def step():
            fast = n[0] % 2 == 0
            n[0] += 1
            engine.scheduler.fast_decode = fast
            out = inner()
            res[fast].append(spent["sched+runner"] * 1e3)
            return out

        engine.step = step
        return spent

    ho.timed = toggled
    b, k = (int(x) for x in os.environ.get("BK", "256,64").split(","))
    ho.run(tok, model, b, k, full_pool="--full-pool" in sys.argv)
    for fast, v in res.items():
        print("fast" if fast else "general", f"median {statistics.median(v):.3f} min {min(v):.3f} n={len(v)}")


if __name__ == "__main__":
    main()
