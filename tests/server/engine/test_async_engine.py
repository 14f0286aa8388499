"""AsyncEngine: the engine thread, the asyncio bridge, cancellation, refusals and a dying loop."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.errors import ContextLengthError, EngineDeadError, QueueFullError
from tests.server.engine.helpers import GREEDY, generate, make_engine, random_prompts, tokens


async def collect(engine: AsyncEngine, request: GenerateRequest) -> list:
    return [d async for d in engine.generate(request)]


def wait_until(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


@pytest.fixture
def engines():
    started: list[AsyncEngine] = []
    yield started
    for e in started:
        e.shutdown()


def test_concurrent_generate_matches_offline(model, tokenizer, engines) -> None:
    prompts = random_prompts(30, [12, 40, 7])
    want = tokens(generate(make_engine(model, tokenizer), prompts))
    engine = AsyncEngine(make_engine(model, tokenizer))
    engines.append(engine)
    assert engine.is_ready

    async def main():
        reqs = [GenerateRequest(f"r{i}", tuple(p), GREEDY) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    results = asyncio.run(main())
    for deltas, expect in zip(results, want, strict=True):
        assert [t for d in deltas for t in d.token_ids] == expect
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == len(expect)
    assert engine.stats().num_running == 0
    engine.engine.scheduler.check()


def test_cancelling_the_iterator_aborts_within_a_step(model, tokenizer, engines) -> None:
    inner = make_engine(model, tokenizer)
    engine = AsyncEngine(inner)
    engines.append(engine)
    (p,) = random_prompts(31, [20])
    steps_at_cancel = []

    async def main():
        async def consume():
            request = GenerateRequest("long", tuple(p), dataclasses.replace(GREEDY, max_tokens=400))
            async for d in engine.generate(request):
                if d.token_ids:
                    got.append(d)

        got: list = []
        task = asyncio.ensure_future(consume())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        steps_at_cancel.append(inner.counters["steps"])
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: not inner.has_unfinished())
    assert inner.counters["finish_abort"] == 1
    assert inner.counters["steps"] - steps_at_cancel[0] <= 2  # the step in flight, at most one more
    wait_until(lambda: engine.stats().num_running == 0)
    sched = inner.scheduler
    assert sched.pool.num_free == sched.pool.num_slots


def test_refusals_come_before_any_delta(model, tokenizer, engines) -> None:
    engine = AsyncEngine(make_engine(model, tokenizer, max_num_seqs=1, max_waiting=2, max_model_len=64),
                         start=False)
    engines.append(engine)
    assert (engine.max_num_seqs, engine.max_waiting) == (1, 2)  # the bounds the HTTP side admits against
    prompts = random_prompts(32, [5, 6, 7])

    async def main():
        with pytest.raises(ContextLengthError):  # validated in the caller, even with the loop not running
            await collect(engine, GenerateRequest("big", tuple(range(3, 70)), GREEDY))
        reqs = [GenerateRequest(f"q{i}", tuple(p), GREEDY) for i, p in enumerate(prompts)]
        tasks = [asyncio.ensure_future(collect(engine, r)) for r in reqs]
        await asyncio.sleep(0.01)  # all three adds wait in the inbox; the loop then takes them in order
        engine.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, b, c = asyncio.run(main())
    assert isinstance(c, QueueFullError)  # two waiting already: the third never produced a delta
    assert [d.finish_reason for d in a][-1] == "length" and [d.finish_reason for d in b][-1] == "length"


def test_a_crashing_loop_fails_requests_and_marks_the_engine_dead(model, tokenizer, engines) -> None:
    inner = make_engine(model, tokenizer)
    real_step, calls = inner.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    inner.step = flaky_step
    engine = AsyncEngine(inner)
    engines.append(engine)
    prompts = random_prompts(33, [5, 9])

    async def main():
        reqs = [GenerateRequest("a", tuple(prompts[0]), dataclasses.replace(GREEDY, n=2)),
                GenerateRequest("b", tuple(prompts[1]), GREEDY)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    a, b = asyncio.run(main())
    for deltas, n in ((a, 2), (b, 1)):
        last = {d.index: d for d in deltas}
        assert sorted(last) == list(range(n))
        assert all(d.finish_reason == "error" and "boom" in d.error for d in last.values())
    assert not engine.is_ready

    async def again():
        await collect(engine, GenerateRequest("c", (5, 6), GREEDY))

    with pytest.raises(EngineDeadError, match="boom"):
        asyncio.run(again())


def test_shutdown_aborts_in_flight(model, tokenizer) -> None:
    inner = make_engine(model, tokenizer)
    engine = AsyncEngine(inner)
    (p,) = random_prompts(34, [10])

    async def main():
        it = engine.generate(GenerateRequest("s", tuple(p), dataclasses.replace(GREEDY, max_tokens=400)))
        first = await it.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        rest = [d async for d in it]
        return [first, *rest]

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort" and deltas[-1].usage is not None
    assert not engine.is_ready and not inner.has_unfinished()
    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(collect(engine, GenerateRequest("t", (5,), GREEDY)))
