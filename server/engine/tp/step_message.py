"""What rank 0 sends every rank each step: the plan and the per-sequence inputs of the forward that
come from sampling parameters (SSC's k), so that every rank runs the same forward.

The wire form is a pickle (protocol 5) of plain frozen data, except that the decode rows - the bulk
of a large step - travel as plain tuples of their fields: pickle rebuilds a slotted dataclass
through a slow generic path (256 rows: ~6 ms to decode on a loaded CPU, ~0.5 ms as tuples). A plan
of 256 decode rows with 20-entry block tables is ~23 KB. The bytes only travel between the server
process and the workers it started, over their private pipes.
"""

from __future__ import annotations

import operator
import pickle
from dataclasses import dataclass, fields, replace

from mcserve.server.engine.plan import DecodeRow, StepPlan


@dataclass(frozen=True, slots=True)
class StepMessage:
    """plan: the step; prefill_top_k / decode_top_k: SSC's k of each prefill chunk and decode row in
    plan order (None: the model's)."""

    plan: StepPlan
    prefill_top_k: tuple[int | None, ...]
    decode_top_k: tuple[int | None, ...]

    def __post_init__(self) -> None:
        assert len(self.prefill_top_k) == len(self.plan.prefill), (len(self.prefill_top_k), len(self.plan.prefill))
        assert len(self.decode_top_k) == len(self.plan.decode), (len(self.decode_top_k), len(self.plan.decode))


@dataclass(frozen=True, slots=True)
class Setup:
    """Pool sizes rank 0 decided (from its device's memory) and every rank allocates."""

    num_state_slots: int
    num_checkpoint_blocks: int
    num_host_blocks: int
    ckpt_dtype: object  # torch.dtype (pickles by name)


STOP = "stop"
Message = StepMessage | Setup | str


_ROW_FIELDS = operator.attrgetter(*(f.name for f in fields(DecodeRow)))
_STEP = "step"


def encode(message: Message) -> bytes:
    if isinstance(message, StepMessage):
        plan = message.plan
        rows = [_ROW_FIELDS(r) for r in plan.decode]
        return pickle.dumps((_STEP, replace(plan, decode=()), rows, message.prefill_top_k, message.decode_top_k),
                            protocol=5)
    return pickle.dumps(message, protocol=5)


def decode(data: bytes) -> Message:
    message = pickle.loads(data)  # noqa: S301 -- bytes from our own parent process, over a private pipe
    if isinstance(message, tuple):
        tag, plan, rows, prefill_top_k, decode_top_k = message
        assert tag == _STEP, tag
        return StepMessage(replace(plan, decode=tuple(DecodeRow(*r) for r in rows)), prefill_top_k, decode_top_k)
    assert isinstance(message, (Setup, str)), type(message)
    return message
