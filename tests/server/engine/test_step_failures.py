"""A failure inside a step fails only the requests it concerns, on the real tiny model: the others
finish with the tokens they get without the fault, nothing stays held, the engine goes on."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm_engine import STALL_STEPS, LLMEngine
from mcserve.server.engine.outputs import Delta
from mcserve.server.engine.plan import BlockCopy, StepPlan
from mcserve.server.engine.runner.base import TransferError
from mcserve.server.engine.runner.torch_runner import TorchModelRunner
from mcserve.server.errors import EngineDeadError
from tests.server.engine.helpers import GREEDY, make_engine, random_prompts

P0, P1, PX, P2 = random_prompts(40, [20, 30, 25, 18])
X = GenerateRequest("x", tuple(PX), GREEDY)
# r0 and r1 decode by step 3, when x arrives; r2 arrives after x and waits behind it (max_num_seqs=3).
REQUESTS = [(0, GenerateRequest("r0", tuple(P0), GREEDY)), (0, GenerateRequest("r1", tuple(P1), GREEDY)),
            (3, X), (3, GenerateRequest("r2", tuple(P2), GREEDY))]


def drive(engine: LLMEngine, requests=REQUESTS) -> dict[str, list[Delta]]:
    """Add each request before the step numbered by its first element; step until all finish."""
    out: dict[str, list[Delta]] = defaultdict(list)
    pending, step = sorted(requests, key=lambda r: r[0]), 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        for d in engine.step():
            out[d.request_id].append(d)
        step += 1
        assert step < 400, "no end"
    return dict(out)


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def is_x_prefill(token_ids) -> bool:
    ids = list(token_ids)
    return any(ids[i:i + 8] == PX[:8] for i in range(len(ids) - 7))


def plan_has_x(plan: StepPlan) -> bool:
    return any(is_x_prefill(c.token_ids) for c in plan.prefill)


def assert_nothing_held(engine: LLMEngine) -> None:
    s = engine.scheduler
    s.check()
    assert not s.running and not s.waiting and s.pool.num_held == 0 and s.cache.num_tables == 0
    assert s.cache.num_used_blocks == s.cache.num_cached_blocks  # only idle cached checkpoints remain


def assert_failed(deltas: list[Delta], match: str) -> None:
    last = deltas[-1]
    assert last.finish_reason == "error" and match in last.error, last
    assert last.usage is not None
    assert [d for d in deltas if d.finish_reason is not None] == [last]


@pytest.fixture(scope="module")
def baseline(model, tokenizer) -> dict[str, list[int]]:
    out = drive(make_engine(model, tokenizer, max_num_seqs=3))
    assert all(d[-1].finish_reason == "length" for d in out.values())
    return {rid: tokens_of(d) for rid, d in out.items()}


class Faulty:
    """The model, except that `prefill_batch` raises for a batch holding x's prompt."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def prefill_batch(self, chunks, *args, **kwargs):
        if any(is_x_prefill(c.token_ids) for c in chunks):
            raise RuntimeError("injected prefill fault")
        return self._model.prefill_batch(chunks, *args, **kwargs)


def test_a_failed_prefill_fails_only_its_request(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    engine.runner.model = Faulty(model)
    out = drive(engine)
    assert_failed(out["x"], "injected prefill fault")
    assert tokens_of(out["x"]) == []
    for rid in ("r0", "r1", "r2"):  # r0, r1 decoded in the step of x's prefill
        assert out[rid][-1].finish_reason == "length" and tokens_of(out[rid]) == baseline[rid]
    assert engine.counters["finish_error"] == 1
    assert_nothing_held(engine)


def test_an_unattributed_runner_failure_fails_the_plan_only(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    inner, plans = engine.runner.execute, []

    def execute(plan, sampling):
        if plan_has_x(plan):
            plans.append(plan)
            raise RuntimeError("injected runner fault")
        return inner(plan, sampling)

    engine.runner.execute = execute
    out = drive(engine)
    (plan,) = plans
    in_plan = {r.seq_id for r in plan.decode} | {c.seq_id for c in plan.prefill}
    assert len(in_plan) == 3  # r0 and r1 decoding, x's prefill
    for rid in ("r0", "r1", "x"):
        assert_failed(out[rid], "injected runner fault")
    assert tokens_of(out["r0"]) == baseline["r0"][:len(tokens_of(out["r0"]))]
    assert out["r2"][-1].finish_reason == "length" and tokens_of(out["r2"]) == baseline["r2"]  # was waiting
    assert_nothing_held(engine)


def test_a_failed_schedule_fails_what_it_was_scheduling(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    pool, calls = engine.scheduler.pool, []
    real_alloc = pool.alloc

    def alloc():
        calls.append(1)
        if len(calls) == 3:  # x's admission, after its checkpoint blocks were taken
            raise AssertionError("injected scheduling invariant")
        return real_alloc()

    pool.alloc = alloc
    out = drive(engine)
    for rid in ("r0", "r1", "x"):  # running, and the waiting head being admitted
        assert_failed(out[rid], "injected scheduling invariant")
    assert out["r2"][-1].finish_reason == "length" and tokens_of(out["r2"]) == baseline["r2"]
    assert_nothing_held(engine)


def test_a_request_that_can_never_be_scheduled_fails_alone(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    sched = engine.scheduler
    real_admit = sched._admit
    sched._admit = lambda seq, st: False if list(seq.token_ids) == PX else real_admit(seq, st)
    out = drive(engine)  # used to trip an assert after 8 empty plans, which killed the engine
    assert_failed(out["x"], f"could not make progress on this request in {STALL_STEPS} steps")
    for rid in ("r0", "r1", "r2"):
        assert out[rid][-1].finish_reason == "length" and tokens_of(out[rid]) == baseline[rid]
    assert_nothing_held(engine)


def test_a_failed_block_copy_rebuilds_the_scheduler(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    inner = engine.runner.execute

    def execute(plan, sampling):
        if plan_has_x(plan):
            raise TransferError("injected copy fault")
        return inner(plan, sampling)

    engine.runner.execute = execute
    out = drive(engine)
    for rid in ("r0", "r1", "x"):  # every sequence that had started
        assert_failed(out[rid], "injected copy fault")
    assert out["r2"][-1].finish_reason == "length" and tokens_of(out["r2"]) == baseline["r2"]
    assert engine.counters["scheduler_rebuilds"] == 1
    assert engine.scheduler.counters is engine.publisher._counters  # metrics keep counting
    assert_nothing_held(engine)


def test_the_torch_runner_reports_a_failed_copy(model, monkeypatch) -> None:
    runner = TorchModelRunner(model, num_state_slots=2, num_checkpoint_blocks=4, num_host_blocks=3)

    def broken(*args):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr("mcserve.server.engine.runner.pools.copy_blocks", broken)
    with pytest.raises(TransferError, match="1 offloads, 0 onloads.*injected"):
        runner.execute(StepPlan(1, offloads=(BlockCopy(3, 0),)), {})


class BadDetokenizerFor:
    """The tokenizer, except that x's detokenizer raises on its first token."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def detokenizer(self, prompt_ids, *args, **kwargs):
        d = self._tokenizer.detokenizer(prompt_ids, *args, **kwargs)
        if list(prompt_ids) == PX:
            def push(*a, **k):
                raise ValueError("injected detokenizer fault")

            d.push = push
        return d


def test_a_failed_stop_rule_fails_its_sequence_only(model, tokenizer, baseline) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    engine.tokenizer = BadDetokenizerFor(tokenizer)
    out = drive(engine)
    assert_failed(out["x"], "injected detokenizer fault")
    for rid in ("r0", "r1", "r2"):
        assert out[rid][-1].finish_reason == "length" and tokens_of(out[rid]) == baseline[rid]
    assert_nothing_held(engine)


def test_an_unusable_device_kills_the_engine(model, tokenizer, monkeypatch) -> None:
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    engine.runner.model = Faulty(model)
    monkeypatch.setattr("mcserve.server.engine.llm_engine.device_usable", lambda device: False)
    with pytest.raises(EngineDeadError, match="device is unusable.*injected prefill fault"):
        drive(engine)
