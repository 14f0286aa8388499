"""The async engine's health: loading / ready / dead, the step watchdog (a slow step counted and
shown in metrics, a step that has not ended yet visible while it runs), and pool counts that tell
running sequences from parked snapshots and idle cached blocks."""

from __future__ import annotations

import asyncio
import threading
import time

from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm import LLM
from mcserve.server.metrics import EngineMetrics
from tests.server.engine.helpers import GREEDY, make_engine, random_prompts


def _run(engine: AsyncEngine, request: GenerateRequest) -> list:
    async def main() -> list:
        return [d async for d in engine.generate(request)]

    return asyncio.run(main())


def _wait(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_states_loading_ready_dead(model, tokenizer, monkeypatch) -> None:
    # A failed step kills the engine only when the device then fails its probe (llm_engine.py).
    monkeypatch.setattr("mcserve.server.engine.llm_engine.device_usable", lambda device: False)
    inner = make_engine(model, tokenizer)
    engine = AsyncEngine(inner, start=False)
    assert engine.health().state == "loading" and not engine.is_ready
    engine.start()
    assert engine.health().state == "ready" and engine.health().error is None

    def boom(plan, sampling):
        raise RuntimeError("device lost")

    inner.runner.execute = boom
    (p,) = random_prompts(1, [8])
    deltas = _run(engine, GenerateRequest("x", tuple(p), GREEDY))
    assert deltas[-1].finish_reason == "error"
    _wait(lambda: engine.health().state == "dead")
    assert "device lost" in engine.health().error and not engine.is_ready
    engine.shutdown()


def test_watchdog_counts_slow_steps_and_shows_a_step_still_running(model, tokenizer) -> None:
    inner = make_engine(model, tokenizer)
    metrics = EngineMetrics("m")
    inner.metrics = metrics
    release, entered = threading.Event(), threading.Event()
    execute = inner.runner.execute

    def stuck_once(plan, sampling):
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return execute(plan, sampling)

    inner.runner.execute = stuck_once
    engine = AsyncEngine(inner, slow_step_s=0.2)
    try:
        (p,) = random_prompts(2, [8])
        done = threading.Thread(target=_run, args=(engine, GenerateRequest("w", tuple(p), GREEDY)))
        done.start()
        assert entered.wait(10)
        _wait(lambda: engine.health().step_running_s > 0.3)
        h = engine.health()
        assert h.stalled and h.slow_steps == 0 and h.state == "ready"  # not ended yet: not counted
        release.set()
        done.join(10)
        h = engine.health()
        assert not h.stalled and h.step_running_s == 0.0
        assert h.slow_steps == 1 and h.last_slow_step_s > 0.3  # the other steps are fast
        text = metrics.render().decode()
        assert 'mcserve:engine_slow_steps_total{model_name="m"} 1.0' in text
        assert f'mcserve:engine_last_slow_step_seconds{{model_name="m"}} {h.last_slow_step_s}' in text
    finally:
        release.set()
        engine.shutdown()


def test_idle_engine_holds_nothing_parked_and_cached_are_counted_apart(model, tokenizer) -> None:
    inner = make_engine(model, tokenizer, num_checkpoint_blocks=64)
    prompts = random_prompts(3, [40, 40, 70])
    llm = LLM.from_engine(inner)
    before = inner.stats()
    assert (before.state_slots_running, before.checkpoint_blocks_running) == (0, 0)
    llm.generate(prompts, GREEDY)
    s = inner.stats()
    # Finished: their slots are parked as snapshots and their checkpoints stay cached, held by nobody.
    assert (s.num_running, s.state_slots_running, s.checkpoint_blocks_running) == (0, 0, 0)
    assert s.state_slots_parked == 3 and s.checkpoint_blocks_cached == inner.scheduler.cache.num_used_blocks > 0
    inner.scheduler.check()

    seen = []
    execute = inner.runner.execute

    def record(plan, sampling):
        out = execute(plan, sampling)
        st = inner.stats()
        seen.append((len(plan.decode) + len(plan.prefill), st.state_slots_running, st.checkpoint_blocks_running))
        return out

    inner.runner.execute = record
    llm.generate(random_prompts(4, [50, 50]), GREEDY)
    assert max(r for _, r, _ in seen) == 2 and max(b for *_, b in seen) >= 2
    inner.scheduler.check()
