"""server/metrics.py: names, buckets, and what RequestTracker records from a stream of deltas."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mcserve.server.engine.client import EngineStats
from mcserve.server.engine.outputs import Delta, Usage
from mcserve.server.metrics import ITL_BUCKETS, TTFT_BUCKETS, EngineMetrics


def _samples(m: EngineMetrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(m.render().decode())
        for s in f.samples
    }


def _value(m: EngineMetrics, name: str, **labels: str) -> float:
    return _samples(m)[(name, tuple(sorted({"model_name": "m", **labels}.items())))]


def test_tracker_records_ttft_itl_tokens_and_finish_reasons() -> None:
    m = EngineMetrics("m")
    t = m.track(prompt_tokens=10, arrival_time=100.0)
    deltas = [  # n=2, interleaved; choice 1 stops on a stop string, choice 0 runs to length
        (100.5, Delta("r", 0, (5,), "a")),
        (100.6, Delta("r", 1, (6,), "b")),
        (100.7, Delta("r", 0, (7,), "c")),
        (100.9, Delta("r", 1, (8,), "", finish_reason="stop")),
        (101.0, Delta("r", 0, (9,), "d", finish_reason="length", usage=Usage(10, 5, cached_tokens=4))),
    ]
    for now, d in deltas:
        t.on_delta(d, now=now)
    t.finish(n=2)
    t.finish(n=2)  # idempotent
    assert _value(m, "mcserve:time_to_first_token_seconds_count") == 1
    assert abs(_value(m, "mcserve:time_to_first_token_seconds_sum") - 0.5) < 1e-9
    assert _value(m, "mcserve:inter_token_latency_seconds_count") == 3  # 0.2 + 0.3 (choice 0), 0.3 (choice 1)
    assert abs(_value(m, "mcserve:inter_token_latency_seconds_sum") - 0.8) < 1e-9
    assert _value(m, "mcserve:prompt_tokens_total") == 10 and _value(m, "mcserve:generation_tokens_total") == 5
    assert _value(m, "mcserve:request_success_total", finished_reason="length") == 1
    assert _value(m, "mcserve:request_success_total", finished_reason="stop") == 1
    assert _value(m, "mcserve:e2e_request_latency_seconds_count") == 1


def test_abandoned_request_counts_its_unfinished_choices_as_abort() -> None:
    m = EngineMetrics("m")
    t = m.track(prompt_tokens=3)
    t.on_delta(Delta("r", 0, (1, 2), "xy"))
    t.finish(n=1)
    assert _value(m, "mcserve:request_success_total", finished_reason="abort") == 1
    assert _value(m, "mcserve:generation_tokens_total") == 2  # counted, since the engine sent no usage


def test_gauges_from_stats_and_vllm_buckets() -> None:
    m = EngineMetrics("m")
    m.set_stats(
        EngineStats(
            num_running=3,
            num_waiting=2,
            state_slots_running=3,
            state_slots_parked=1,
            state_slots_total=8,
            checkpoint_blocks_running=16,
            checkpoint_blocks_cached=40,
            checkpoint_blocks_total=64,
        )
    )
    assert _value(m, "mcserve:num_requests_running") == 3 and _value(m, "mcserve:num_requests_waiting") == 2
    # Usage is what running sequences hold: parked snapshots and idle cached blocks are given up on demand.
    assert _value(m, "mcserve:state_slot_usage") == 3 / 8 and _value(m, "mcserve:checkpoint_pool_usage") == 0.25
    slots = {s: _value(m, "mcserve:state_slots", state=s) for s in ("running", "parked", "free")}
    blocks = {s: _value(m, "mcserve:checkpoint_blocks", state=s) for s in ("running", "cached", "free")}
    assert slots == {"running": 3, "parked": 1, "free": 4} and blocks == {"running": 16, "cached": 40, "free": 8}
    buckets = {float(dict(k[1])["le"]) for k in _samples(m) if k[0] == "mcserve:time_to_first_token_seconds_bucket"}
    assert buckets == {*TTFT_BUCKETS, float("inf")}
    buckets = {float(dict(k[1])["le"]) for k in _samples(m) if k[0] == "mcserve:inter_token_latency_seconds_bucket"}
    assert buckets == {*ITL_BUCKETS, float("inf")}
