"""Async scheduling (server/engine/pipeline.py) on CPU with the CUDA runner's code: the engine that
launches step n+1 before it collects step n gives the synchronous engine's token ids, finish
reasons and usage in every case where the pipeline must drop a token, drain or hold a row, and it
really overlaps (launch n+1 before collect n) in steady decode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mcserve.server.engine import llm_engine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.runner.factory import RunnerOptions, use_async_scheduling
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.errors import ConfigError
from tests.server.engine.helpers import GREEDY, generate, make_engine, random_prompts, tokens

SYNC = RunnerOptions("cuda", async_scheduling=False)
ASYNC = RunnerOptions("cuda", async_scheduling=True)


class Order:
    """Records the runner's launch and collect calls: ("launch" | "collect", step, seq ids of the plan)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.events: list[tuple[str, int, frozenset[int]]] = []
        self.guided: list[int] = []  # steps launched while a sequence with a grammar was live
        runner, launch, collect, of = engine.runner, engine.runner.launch, engine.runner.collect, {}

        def _launch(plan, sampling):
            handle = launch(plan, sampling)
            ids = frozenset(r.seq_id for r in plan.decode) | frozenset(c.seq_id for c in plan.prefill)
            of[id(handle)] = (plan.step, ids)
            self.events.append(("launch", plan.step, ids))
            if engine.masks:
                self.guided.append(plan.step)
            return handle

        def _collect(handle):
            step, ids = of.pop(id(handle))
            self.events.append(("collect", step, ids))
            return collect(handle)

        runner.launch, runner.collect = _launch, _collect

    def index(self, kind: str, step: int) -> int:
        return next(i for i, (k, s, _) in enumerate(self.events) if k == kind and s == step)

    def overlapped(self) -> list[int]:
        """Steps s launched before step s-1 was collected."""
        launched = [s for k, s, _ in self.events if k == "launch"]
        return [s for s in launched if s - 1 in launched and self.index("launch", s) < self.index("collect", s - 1)]


def results(outs) -> list[list[tuple]]:
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] + [o.usage] for o in outs]


def both(model, tokenizer, prompts, params, **overrides):
    """(sync outputs, async outputs, async engine, its Order)."""
    want = generate(make_engine(model, tokenizer, runner=SYNC, **overrides), prompts, params)
    engine = make_engine(model, tokenizer, runner=ASYNC, **overrides)
    order = Order(engine)
    got = generate(engine, prompts, params)
    assert_idle(engine)
    return want, got, engine, order


def assert_idle(engine: LLMEngine) -> None:
    sched = engine.scheduler
    sched.check()
    assert not sched.running and not sched.waiting and not engine.has_unfinished()
    assert sched.cache.num_used_blocks == sched.cache.num_cached_blocks  # nothing held by anyone


def test_rows_with_different_max_tokens_greedy_and_seeded(model, tokenizer) -> None:
    prompts = random_prompts(20, [50, 33, 70, 20, 41, 16])
    for base in (GREEDY, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11, ignore_eos=True)):
        params = [dataclasses.replace(base, max_tokens=m, seed=None if base.seed is None else base.seed + m)
                  for m in (30, 1, 17, 5, 40, 2)]
        params[2] = dataclasses.replace(params[2], n=2)
        params[0] = dataclasses.replace(params[0], logprobs=2, repetition_penalty=1.2, frequency_penalty=0.3)
        want, got, engine, order = both(model, tokenizer, prompts, params)
        assert results(got) == results(want)
        assert [len(o.outputs[0].token_ids) for o in got] == [30, 1, 17, 5, 40, 2]
        assert len(got[0].outputs[0].logprobs) == 30
        assert len(order.overlapped()) > 25


def test_steady_decode_launches_the_next_step_before_collecting(model, tokenizer) -> None:
    engine = make_engine(model, tokenizer, runner=ASYNC)
    order = Order(engine)
    out = generate(engine, random_prompts(21, [20]), dataclasses.replace(GREEDY, max_tokens=12))
    assert len(out[0].outputs[0].token_ids) == 12
    kinds = [(k, s) for k, s, _ in order.events]
    # step 1 prefills (collected at once); from then on each decode step is launched before the one
    # before is collected; step 12 samples the 12th token, so step 13 leaves the row out (max_tokens)
    assert kinds[:4] == [("launch", 1), ("collect", 1), ("launch", 2), ("launch", 3)]
    assert order.overlapped() == list(range(3, 14))
    assert [ids for k, s, ids in order.events if k == "launch" and s == 13] == [frozenset()]
    assert max(s for _, s in kinds) == 13


def test_stop_tokens_and_stop_strings_at_different_steps(model, tokenizer) -> None:
    prompts = random_prompts(22, [30, 45, 17, 60])
    free = dataclasses.replace(GREEDY, max_tokens=30)
    first = generate(make_engine(model, tokenizer, runner=SYNC), prompts, free)
    toks = tokens(first)
    text = first[2].outputs[0].text
    stop_str = text[len(text) // 2:len(text) // 2 + 2]
    assert stop_str.strip()
    params = [dataclasses.replace(free, stop_token_ids=[toks[0][3]]),
              dataclasses.replace(free, stop_token_ids=[toks[1][12]]), dataclasses.replace(free, stop=[stop_str]), free]
    want, got, engine, order = both(model, tokenizer, prompts, params)
    assert results(got) == results(want)
    assert sum(o.outputs[0].finish_reason == "stop" for o in want) == 3
    assert order.overlapped() and engine.counters["async_dropped_tokens"] == 3


def eos_params(engine_eos: frozenset[int], seed: int, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, logit_bias={t: 4.0 for t in engine_eos})


def test_eos_at_different_steps(model, tokenizer) -> None:
    eos = make_engine(model, tokenizer, runner=SYNC).eos_token_ids
    prompts = random_prompts(23, [30, 45, 17, 60, 8])
    params = [eos_params(eos, seed) for seed in range(5)]
    want, got, engine, _ = both(model, tokenizer, prompts, params)
    assert results(got) == results(want)
    ends = [len(o.outputs[0].token_ids) for o in want if o.outputs[0].finish_reason == "stop"]
    # a row that ends on its prefill's token was not in flight: nothing to drop
    assert len(set(ends)) >= 2 and engine.counters["async_dropped_tokens"] == sum(n > 1 for n in ends) > 0


def test_next_turn_after_an_eos_finished_turn_is_exact(model, tokenizer) -> None:
    """Turn 1 ends with eos while its row is already in flight once more: the parked state has
    consumed the eos token, so turn 2 (turn 1 + answer + a new message) resumes from it, exactly."""
    engine = make_engine(model, tokenizer, runner=ASYNC, enable_snapshots=True)
    hits, computed = 0, []
    for i, n in enumerate((45, 31, 16)):
        first, extra = random_prompts(30 + i, [n, 9])
        answer = generate(engine, [first], eos_params(engine.eos_token_ids, seed=i))[0].outputs[0]
        assert answer.finish_reason == "stop"
        turn2 = first + answer.token_ids + extra
        before, prefilled = engine.counters["snapshot_hit"], engine.counters["prefill_tokens"]
        warm = generate(engine, [turn2])[0].outputs[0].token_ids
        hits += engine.counters["snapshot_hit"] - before
        computed.append(engine.counters["prefill_tokens"] - prefilled == len(extra))
        assert warm == tokens(generate(make_engine(model, tokenizer, runner=SYNC), [turn2]))[0]
    # the state parked after the eos token was fed: only the new message is computed
    assert hits > 0 and any(computed) and engine.counters["async_dropped_tokens"] > 0
    assert_idle(engine)


def drive(engine: LLMEngine, arrivals: dict[int, list[GenerateRequest]], abort: tuple[str, int] | None = None
          ) -> dict[str, list]:
    """Add requests before the numbered step() calls; abort request `abort[0]` once it has
    `abort[1]` tokens. Returns each request's (token ids, finish reason)."""
    toks: dict[str, list[int]] = {}
    reason: dict[str, str | None] = {}
    call = 0
    while call <= max(arrivals) or engine.has_unfinished():
        for r in arrivals.get(call, ()):
            engine.add_request(r)
            toks[r.request_id], reason[r.request_id] = [], None
        for d in engine.step():
            toks[d.request_id] += d.token_ids
            reason[d.request_id] = d.finish_reason or reason[d.request_id]
        if abort is not None and reason.get(abort[0], "x") is None and len(toks[abort[0]]) >= abort[1]:
            if engine.pipeline is not None:  # the row is in flight in the step launched
                (req, c), = [v for v in engine._by_seq.values() if v[0].request.request_id == abort[0]]
                pending = engine.pipeline.pending
                assert pending is not None and c.seq.seq_id in {r.seq_id for r in pending.plan.decode}
            for d in engine.abort(abort[0]):
                assert not d.token_ids  # the token in flight is dropped
                reason[d.request_id] = d.finish_reason
        call += 1
    return {k: (toks[k], reason[k]) for k in toks}


def requests(seed: int, lengths: list[int], max_tokens: list[int]) -> list[GenerateRequest]:
    return [GenerateRequest(f"r{seed}-{i}", tuple(p), dataclasses.replace(GREEDY, max_tokens=m))
            for i, (p, m) in enumerate(zip(random_prompts(seed, lengths), max_tokens, strict=True))]


def test_abort_of_a_row_in_flight(model, tokenizer) -> None:
    reqs = requests(24, [30, 20, 41], [30, 30, 25])
    out = []
    for runner in (SYNC, ASYNC):
        engine = make_engine(model, tokenizer, runner=runner)
        out.append(drive(engine, {0: reqs}, abort=("r24-1", 7)))
        assert_idle(engine)
        assert engine.counters["async_dropped_tokens"] == (runner is ASYNC)
        assert engine.scheduler.pool.num_free + engine.scheduler.pool.num_parked == engine.scheduler.pool.num_slots
    assert out[0] == out[1]
    assert out[1]["r24-1"] == (out[1]["r24-1"][0], "abort") and len(out[1]["r24-1"][0]) == 7


def test_rows_joining_while_others_decode(model, tokenizer) -> None:
    reqs = requests(25, [30, 20, 41, 64, 17], [40, 30, 12, 20, 16])
    arrivals = {0: reqs[:2], 6: [reqs[2]], 9: [reqs[3]], 20: [reqs[4]]}
    want = drive(make_engine(model, tokenizer, runner=SYNC, max_num_batched_tokens=32), arrivals)
    engine = make_engine(model, tokenizer, runner=ASYNC, max_num_batched_tokens=32)
    order = Order(engine)
    assert drive(engine, arrivals) == want
    assert_idle(engine)
    # prefill steps were collected right after their launch (the pipeline drained), then it resumed
    launched = [s for k, s, _ in order.events if k == "launch"]
    drained = [s for s in launched if order.index("collect", s) == order.index("launch", s) + 1]
    assert len(drained) >= 4 and any(s + 2 in order.overlapped() for s in drained)


def test_preemption_with_a_tiny_pool(model, tokenizer) -> None:
    prompts = random_prompts(4, [50, 33, 70, 20, 41])
    params = dataclasses.replace(GREEDY, max_tokens=40)
    want, got, engine, order = both(model, tokenizer, prompts, params, max_num_seqs=4, max_model_len=128,
                                    num_checkpoint_blocks=8, num_state_slots=4, evict_running_checkpoints=False)
    assert results(got) == results(want)
    assert engine.counters["preempt"] > 0 and order.overlapped()


def test_a_grammar_row_runs_synchronously(model, tokenizer) -> None:
    from mcserve.server.engine.structured.spec import StructuredSpec

    if make_engine(model, tokenizer, runner=SYNC).masks is None:
        pytest.skip("llguidance is not installed")
    prompts = random_prompts(26, [20, 33, 9])
    free = dataclasses.replace(GREEDY, max_tokens=40)
    guided = SamplingParams(temperature=0.0, max_tokens=30, structured=StructuredSpec("regex", "[a-z]{2,4}-[0-9]{3}"))
    want, got, engine, order = both(model, tokenizer, prompts, [free, guided, free])
    assert results(got) == results(want)
    assert order.guided and not set(order.guided) & set(order.overlapped())
    assert order.overlapped()  # the free rows overlap once the guided one has finished


def test_a_failed_step_fails_its_rows_and_the_pipeline_drains(model, tokenizer) -> None:
    engine = make_engine(model, tokenizer, runner=ASYNC)
    order = Order(engine)
    collect, failed = engine.runner.collect, []

    def faulty(handle):
        out = collect(handle)
        if engine.counters["steps"] == 8 and not failed:
            failed.append(order.events[-1][1])
            raise RuntimeError("injected collect fault")
        return out

    engine.runner.collect = faulty
    reqs = requests(27, [30, 20], [30, 30])
    out = drive(engine, {0: reqs, 12: requests(28, [25], [10])})
    assert out["r27-0"][1] == out["r27-1"][1] == "error"
    assert out["r28-0"] == drive(make_engine(model, tokenizer, runner=SYNC), {0: requests(28, [25], [10])})["r28-0"]
    assert_idle(engine)


def test_the_flag_reaches_the_engine_and_is_ignored_without_the_cuda_runner(model, tokenizer, caplog) -> None:
    from mcserve.server.engine.args import EngineArgs

    assert EngineArgs(async_scheduling=True).runner_options().async_scheduling is True
    assert EngineArgs(async_scheduling=False).runner_options().async_scheduling is False
    assert EngineArgs().runner_options().async_scheduling is None  # auto
    assert make_engine(model, tokenizer, runner=ASYNC).pipeline is not None
    assert make_engine(model, tokenizer, runner=SYNC).pipeline is None
    with caplog.at_level("WARNING"):
        engine = make_engine(model, tokenizer, runner=RunnerOptions("torch", async_scheduling=True))
    assert engine.pipeline is None and "async scheduling ignored" in caplog.text
    (p,) = random_prompts(29, [20])
    assert tokens(generate(engine, [p])) == tokens(generate(make_engine(model, tokenizer, runner=ASYNC), [p]))


@pytest.mark.parametrize("kind", ["torch", "cuda"])
def test_auto_is_async_where_the_runner_overlaps_on_a_cuda_device(model, tokenizer, kind: str) -> None:
    """The tri-state against real runners: auto is on only for a runner that overlaps (the CUDA
    runner) on a CUDA device; True follows the runner wherever it runs; False is always serial."""
    runner = make_engine(model, tokenizer, runner=RunnerOptions(kind, async_scheduling=False)).runner
    overlaps = kind == "cuda"
    assert runner.overlaps is overlaps
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    for device in (cpu, cuda):
        assert use_async_scheduling(RunnerOptions(kind, async_scheduling=False), runner, device) is False
        assert use_async_scheduling(RunnerOptions(kind, async_scheduling=True), runner, device) is overlaps
    assert use_async_scheduling(RunnerOptions(kind), runner, cpu) is False
    assert use_async_scheduling(RunnerOptions(kind), runner, cuda) is overlaps
    assert use_async_scheduling(None, runner, cuda) is overlaps  # an engine built without options


@pytest.mark.parametrize("value", [1, 0, "on", "auto"])
def test_async_scheduling_is_none_true_or_false(value) -> None:
    from mcserve.server.engine.args import EngineArgs

    with pytest.raises(ConfigError, match="async_scheduling"):
        RunnerOptions("cuda", async_scheduling=value)
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineArgs(async_scheduling=value)


def test_auto_on_cpu_is_serial_without_a_warning(model, tokenizer, caplog) -> None:
    """CPU (the suite): auto leaves every engine serial, the CUDA runner's code included, and says
    nothing; only an explicit True pipelines there."""
    with caplog.at_level("INFO"):
        for options in (None, RunnerOptions(), RunnerOptions("torch"), RunnerOptions("cuda"), SYNC):
            assert make_engine(model, tokenizer, runner=options).pipeline is None, options
    assert "async scheduling" not in caplog.text
    assert make_engine(model, tokenizer, runner=ASYNC).pipeline is not None


def test_auto_on_a_cuda_device_runs_the_pipeline(model, tokenizer, monkeypatch, caplog) -> None:
    """The engine follows the resolution: with the device taken as CUDA, auto pipelines the CUDA
    runner (no warning) and gives the serial engine's tokens; the torch runner stays serial, silently."""
    def as_if_cuda(options, runner, device):
        return use_async_scheduling(options, runner, torch.device("cuda"))

    prompts = random_prompts(33, [21, 34, 9])
    want = tokens(generate(make_engine(model, tokenizer, runner=SYNC), prompts))
    monkeypatch.setattr(llm_engine, "use_async_scheduling", as_if_cuda)
    with caplog.at_level("WARNING"):
        auto = make_engine(model, tokenizer, runner=RunnerOptions("cuda"))
        serial = make_engine(model, tokenizer, runner=RunnerOptions("cuda", async_scheduling=False))
        torch_runner = make_engine(model, tokenizer, runner=RunnerOptions("torch"))
    assert auto.pipeline is not None and serial.pipeline is None and torch_runner.pipeline is None
    assert "async scheduling" not in caplog.text
    order = Order(auto)
    assert tokens(generate(auto, prompts)) == want
    assert order.overlapped()


def test_rows_ending_with_eos_while_others_join_then_their_next_turns(model, tokenizer) -> None:
    """A row that ends at step n with a prefill in step n+1 (launched before n is collected) was
    stepped in n+1 too: its parked state must say so, or the next turn resumes from a wrong state."""
    eos = make_engine(model, tokenizer, runner=SYNC).eos_token_ids
    prompts = random_prompts(31, [30, 20, 41, 25, 33, 18, 27, 22, 19, 35, 21, 26, 31, 17])
    reqs = [GenerateRequest(f"j{i}", tuple(p), eos_params(eos, seed=40 + i)) for i, p in enumerate(prompts)]
    # a request every 3rd call: the pipeline restarts in between, so a prefill meets a step in flight
    arrivals = {3 * i: [r] for i, r in enumerate(reqs)} | {0: [reqs[0], *requests(32, [24, 28], [30, 30])]}
    want = drive(make_engine(model, tokenizer, runner=SYNC), arrivals)
    engine = make_engine(model, tokenizer, runner=ASYNC)
    launch, collect, finish = engine.runner.launch, engine.runner.collect, engine._finish
    mixed: list = [None]  # (handle, decode seq ids) of a launched plan with prefill chunks, until collected
    cases = []

    def _launch(plan, sampling):
        handle = launch(plan, sampling)
        if plan.prefill:
            mixed[0] = (handle, {r.seq_id for r in plan.decode})
        return handle

    def _collect(handle):
        if mixed[0] is not None and mixed[0][0] is handle:
            mixed[0] = None
        return collect(handle)

    def _finish(req, c, reason, *a, **k):
        if mixed[0] is not None and c.seq.seq_id in mixed[0][1]:
            cases.append(reason)
        return finish(req, c, reason, *a, **k)

    engine.runner.launch, engine.runner.collect, engine._finish = _launch, _collect, _finish
    got = drive(engine, arrivals)
    assert got == want
    assert cases.count("stop") >= 2  # rows that ended while a step with a prefill, holding them, was in flight
    ended = [p + got[r.request_id][0] + [7, 8, 9] for p, r in zip(prompts, reqs, strict=True)
             if got[r.request_id][1] == "stop" and len(got[r.request_id][0]) > 1]
    hits = engine.counters["snapshot_hit"]
    assert tokens(generate(engine, ended)) == tokens(generate(make_engine(model, tokenizer, runner=SYNC), ended))
    assert engine.counters["snapshot_hit"] > hits
    assert_idle(engine)
