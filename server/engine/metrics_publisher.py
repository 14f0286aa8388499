"""The engine's side of the metrics: turns the scheduler's running counters and the runner's
per-layer checkpoint reads into calls on an `EngineMetrics` (server/metrics.py), once per step.

The engine never imports server/metrics.py (it sits above the engine); it gets the object at start-up
or None (offline use), and calls only the `on_*` / `count_*` methods.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mcserve.server.engine.runner.base import ModelRunner

# Steps between transfers of the per-layer checkpoint-read counts (each costs a device->host copy).
SELECTIONS_EVERY = 16
# checkpoint cache counter (cache/cache.py's docstring) -> the `reason` label of
# checkpoint_evictions_total: every way a cached checkpoint is dropped
EVICTION_LABELS = {"evict_idle": "idle", "evict_unreachable": "unreachable", "evict_host": "host",
                   "drop_running": "running"}


class MetricsPublisher:
    def __init__(self, metrics: Any, counters: Counter[str], runner: ModelRunner, reads_cache: bool) -> None:
        """metrics: an EngineMetrics or None (then every call does nothing). counters: the scheduler's,
        read, never written."""
        self.metrics = metrics
        self._counters = counters
        self._published: Counter[str] = Counter()  # counter values already reported
        self._runner = runner
        self._reads_cache = reads_cache

    def on_queue_time(self, seconds: float) -> None:
        """A request's first schedule, `seconds` after it arrived."""
        if self.metrics is not None:
            self.metrics.on_queue_time(seconds)

    def on_failure(self, reason: str) -> None:
        """A sequence failed inside a step (failures.py names the reason)."""
        if self.metrics is not None:
            self.metrics.count_request_failure(reason)

    def publish(self, step: int) -> None:
        """Report what the scheduler counted since the last call; the runner's per-layer checkpoint
        reads every `SELECTIONS_EVERY` steps."""
        m = self.metrics
        if m is None:
            return
        if self._reads_cache and step % SELECTIONS_EVERY == 0:
            for layer, n in enumerate(self._runner.take_selections()):
                if n:
                    m.count_ssc_selections(layer, n)
        now, before = self._counters, self._published
        diff = {k: now[k] - before[k] for k in now if now[k] != before[k]}
        if not diff:
            return
        before.update(diff)
        if diff.get("preempt"):
            m.on_preemption(diff["preempt"])
        if diff.get("prefix_query_tokens"):
            m.on_prefix_cache_query(diff["prefix_query_tokens"], diff.get("prefix_hit_tokens", 0))
        for key, label in EVICTION_LABELS.items():
            if diff.get(key):
                m.count_eviction(label, diff[key])
        if diff.get("offload"):
            m.count_offload(diff["offload"])
