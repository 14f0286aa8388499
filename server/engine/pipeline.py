"""Async scheduling: the engine's step pipeline, which launches a decode step before it processes the
outputs of the step before, so the device computes step n+1 while the host does step n's update,
stop rules and deltas (docs/RUNNER.md, "Async scheduling").

One `step()` with step n in flight: plan n+1 (rows that surely end at n, by max_tokens or
max_model_len, left out), launch it, `Scheduler.advance` its decode rows, then collect n and apply
its outputs (`LLMEngine.apply`). A decode-only n+1 stays in flight for the next call; anything else
(prefill chunks, an empty plan) is collected at once: the pipeline drains and the next call starts
it again (that call returns no deltas). Its decode rows are advanced all the same: a row that
finishes at n has been stepped in n+1 whatever else n+1 holds. Plans do not depend on token values: positions
and boundary blocks follow from the counts, and every decode input is on the device already (the
sampler writes each row's next token into the persistent batch).

What is never overlapped: while a sequence with a grammar is live, step n is collected before n+1
is planned (its next mask needs n's token), and a failed step drains the pipeline. A sequence that
finishes at n (a stop token or string, eos) was stepped once more in n+1: that token is dropped
when n+1 is collected (it was computed and counted), and the sequence keeps n+1's state, which has
consumed its last token; `Scheduler.finish` parks that state under the tokens it consumed (or frees
it). An abort between calls frees at once what the sequence holds, as in synchronous mode: its slot
and blocks go to other sequences only in later plans, whose device work is queued after n+1 on the
same stream, and n+1's output for it is dropped (it is no longer known).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mcserve.server.engine.plan import StepPlan
from mcserve.server.errors import EngineDeadError

if TYPE_CHECKING:
    from mcserve.server.engine.llm_engine import LLMEngine


@dataclass(frozen=True, slots=True)
class InFlight:
    """A launched step (its decode rows advanced in the scheduler): its plan and the runner's handle."""

    plan: StepPlan
    handle: object


class StepPipeline:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.pending: InFlight | None = None  # launched by the last call, collected by the next

    def step(self) -> None:
        """Launch the next step, then collect the one in flight; the deltas go to the engine's list."""
        e = self.engine
        pending, self.pending = self.pending, None
        if pending is not None and e.masks:  # a guided sequence's next mask needs the tokens in flight
            self._collect(pending)
            pending = None
        plan: StepPlan | None = None
        try:
            plan = e.schedule(self._ending(pending))
            handle = e.runner.launch(plan, e._sampling_rows(plan))
        except EngineDeadError:
            raise
        except Exception as err:  # the new step fails its sequences; the one in flight is collected first
            if pending is not None:
                self._collect(pending)
            e.step_failed(plan, err)
            return
        e.scheduler.advance(plan)
        launched = InFlight(plan, handle)
        overlap = bool(plan.decode) and not plan.prefill
        ok = pending is None or self._collect(pending)
        if overlap and ok:
            self.pending = launched
        else:  # drain: prefill in the plan, or the step before failed
            self._collect(launched)

    def _ending(self, pending: InFlight | None) -> set[int]:
        """Rows of the step in flight whose sequences surely end with it (their `last` token count)."""
        if pending is None:
            return set()
        by_seq = self.engine._by_seq
        return {r.seq_id for r in pending.plan.decode
                if (rc := by_seq.get(r.seq_id)) is not None and len(rc[1].seq.token_ids) >= rc[1].last}

    def _collect(self, f: InFlight) -> bool:
        """Wait for a launched step and apply its outputs; False if it failed (its sequences did)."""
        e = self.engine
        try:
            e.apply(f.plan, e.runner.collect(f.handle), advanced=True)
        except EngineDeadError:
            raise
        except Exception as err:
            e.step_failed(f.plan, err)
            return False
        return True
