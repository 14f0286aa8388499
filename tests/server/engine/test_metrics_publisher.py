"""The metrics publisher on its own: each scheduler count reported once, under the right label."""

from __future__ import annotations

from collections import Counter

from mcserve.server.engine.metrics_publisher import SELECTIONS_EVERY, MetricsPublisher


class Calls:
    """Records every EngineMetrics method called on it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


class Runner:
    def __init__(self) -> None:
        self.taken = 0

    def take_selections(self) -> list[int]:
        self.taken += 1
        return [3, 0, 5]


def test_reports_differences_once_with_labels() -> None:
    counters: Counter[str] = Counter()
    m, runner = Calls(), Runner()
    pub = MetricsPublisher(m, counters, runner, reads_cache=True)
    counters.update(preempt=2, evict_idle=1, drop_running=4, offload=3, prefix_query_tokens=10,
                    prefix_hit_tokens=8, snapshot_park=1)
    pub.publish(1)
    assert sorted(m.calls) == sorted([("on_preemption", 2), ("on_prefix_cache_query", 10, 8),
                                      ("count_eviction", "idle", 1), ("count_eviction", "running", 4),
                                      ("count_offload", 3)])
    m.calls.clear()
    pub.publish(2)
    assert m.calls == []  # nothing new
    counters.update(evict_unreachable=2, evict_host=1)
    pub.publish(SELECTIONS_EVERY)
    assert sorted(m.calls) == sorted([("count_ssc_selections", 0, 3), ("count_ssc_selections", 2, 5),
                                      ("count_eviction", "unreachable", 2), ("count_eviction", "host", 1)])
    assert runner.taken == 1


def test_without_metrics_nothing_is_read() -> None:
    runner = Runner()
    pub = MetricsPublisher(None, Counter(preempt=1), runner, reads_cache=True)
    pub.publish(SELECTIONS_EVERY)
    pub.on_queue_time(1.0)
    assert runner.taken == 0
