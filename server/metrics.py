"""Prometheus metrics, named and bucketed like vLLM v1's (prefix `mcserve:` for `vllm:`), plus MC's own.

Each `EngineMetrics` owns a `CollectorRegistry`, so several servers (or tests) can live in one process.
prometheus-client is thread-safe: the engine thread and the event loop may both record.

Who records what (each number has exactly one writer, so nothing is counted twice):

- The HTTP layer (`RequestTracker`, from the deltas it streams): prompt_tokens_total,
  generation_tokens_total, request_success_total{finished_reason}, time_to_first_token_seconds,
  inter_token_latency_seconds, e2e_request_latency_seconds.
- `EngineStats`, read at scrape time (`set_stats`): num_requests_running / waiting, state_slot_usage and
  checkpoint_pool_usage (held by running sequences: the pressure an alert wants), state_slots{state}
  (running / parked / free) and checkpoint_blocks{state} (running / cached / free). Parked snapshots
  and idle cached blocks are given up on demand, so they do not count as used.
- The async engine's watchdog (`on_slow_step`): engine_slow_steps_total, engine_last_slow_step_seconds.
- The HTTP middleware (`count_http`): http_requests_total{route, status}, every request including those
  rejected before routing (401, 413, 503 while draining); `route` is the matched template or "other".
- The /metrics endpoint (`set_ready`): server_ready (1 = /health answers 200).
- Fixed at start: build_info{version, python_version, torch_version} = 1; prometheus-client's process
  collector (process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...).
- The engine, through the `on_*` / `count_*` methods: request_queue_time_seconds, num_preemptions_total,
  prefix_cache_queries_total / prefix_cache_hits_total, checkpoint_evictions_total{reason},
  checkpoint_offloads_total{reason}, ssc_selections_total{layer}, request_failures_total{reason}
  (sequences failed by an error inside the engine, by cause: server/engine/failures.py).

A request with n choices counts n in request_success_total (one per sequence, as vLLM counts its n
child requests) but its prompt once in prompt_tokens_total (as `usage` reports it).
Requests that never reach the HTTP layer (offline `LLM.generate`) are therefore not in the
per-request metrics; the engine-side ones still count.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from mcserve.server.engine.client import EngineStats
from mcserve.server.engine.failures import FAILURE_REASONS
from mcserve.server.engine.metrics_publisher import EVICTION_LABELS
from mcserve.server.engine.outputs import Delta
from mcserve.server.engine.sequence import FINISH_REASONS

PREFIX = "mcserve:"

# The `*_created` timestamp series double the scrape size and no dashboard uses them (vLLM drops
# them too). This is a process-wide prometheus-client switch.
disable_created_metrics()

# Every value these labels take, created at zero so that rates and panels exist before the first event;
# the eviction reasons are the labels the engine's publisher maps the checkpoint cache's counters to.
EVICTION_REASONS = tuple(EVICTION_LABELS.values())
OFFLOAD_REASONS = ("pressure",)
# HTTP statuses the server answers with, pre-created for the generation routes.
HTTP_STATUSES = ("200", "400", "401", "404", "413", "499", "500", "503")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")

# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on


class EngineMetrics:
    """All metrics of one server. The engine calls the `on_*`/`count_*` methods; the HTTP layer uses
    `track()` and `set_stats()`; `/metrics` serves `render()`."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, m, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, m + list(extra), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, m, buckets=buckets, registry=r)

        self._running = gauge("num_requests_running", "Requests in the running batch.")
        self._waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self._slot_usage = gauge(
            "state_slot_usage", "Fraction of online-state slots held by running sequences (0..1; parked excluded)."
        )
        self._pool_usage = gauge(
            "checkpoint_pool_usage",
            "Fraction of checkpoint blocks held by running sequences (0..1; idle cached blocks excluded).",
        )
        self._slots = Gauge(PREFIX + "state_slots", "State slots by state.", m + ["state"], registry=r)
        self._blocks = Gauge(
            PREFIX + "checkpoint_blocks", "Device checkpoint blocks by state.", m + ["state"], registry=r
        )
        self._slow_steps = counter("engine_slow_steps", "Engine steps that took longer than the watchdog's budget.")
        self._last_slow_step = gauge("engine_last_slow_step_seconds", "Duration of the last slow engine step.")
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self._generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = counter("request_success", "Finished sequences by finish reason.", ("finished_reason",))
        self._preemptions = counter("num_preemptions", "Sequences preempted (recomputed later).")
        self._prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix index.")
        self._prefix_hits = counter("prefix_cache_hits", "Prompt tokens served from cached checkpoints.")
        self._evictions = counter(
            "checkpoint_evictions",
            "Checkpoint blocks dropped, by reason: idle (no holder, on the GPU), unreachable (no holder, its"
            " parent left the prefix index), host (an idle host block, for an offload), running (held, host pool"
            " full).",
            ("reason",),
        )
        self._offloads = counter(
            "checkpoint_offloads", "Checkpoint blocks moved to host memory, by reason.", ("reason",)
        )
        self._ssc = counter("ssc_selections", "Checkpoints selected by SSC's top-k, per layer.", ("layer",))
        self._failures = counter("request_failures", "Sequences failed by an error inside the engine, by cause.",
                                 ("reason",))
        self._ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self._itl = histogram(
            "inter_token_latency_seconds", "Time between successive outputs of a sequence.", ITL_BUCKETS
        )
        self._e2e = histogram("e2e_request_latency_seconds", "Arrival to last output.", REQUEST_LATENCY_BUCKETS)
        self._queue = histogram(
            "request_queue_time_seconds", "Time spent waiting before the first schedule.", REQUEST_LATENCY_BUCKETS
        )
        self._http = counter("http_requests", "HTTP requests by route template and status.", ("route", "status"))
        self._ready = gauge("server_ready", "1 while /health answers 200 (loaded, engine alive, not draining).")
        self._build = Gauge(
            PREFIX + "build_info", "Always 1; the labels say what is running.",
            ["model_name", "version", "python_version", "torch_version"], registry=r,
        )
        self._build.labels(model_name, _version("mcserve"), platform.python_version(), _version("torch")).set(1)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # Touch label sets that exist for every server so dashboards see zeros, not gaps.
        for metric in (
            self._ready,
            self._running,
            self._waiting,
            self._slot_usage,
            self._pool_usage,
            self._prompt_tokens,
            self._generation_tokens,
            self._preemptions,
            self._prefix_queries,
            self._prefix_hits,
            self._ttft,
            self._itl,
            self._e2e,
            self._queue,
            self._slow_steps,
            self._last_slow_step,
        ):
            metric.labels(model_name)
        for state in ("running", "parked", "free"):
            self._slots.labels(model_name, state)
        for reason in FAILURE_REASONS:
            self._failures.labels(model_name, reason)
        for state in ("running", "cached", "free"):
            self._blocks.labels(model_name, state)
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        for reason in EVICTION_REASONS:
            self._evictions.labels(model_name, reason)
        for reason in OFFLOAD_REASONS:
            self._offloads.labels(model_name, reason)

    def set_ready(self, ready: bool) -> None:
        """Scrape time: what /health would answer (1 = 200)."""
        self._ready.labels(self.model_name).set(1 if ready else 0)

    def declare_layers(self, num_layers: int) -> None:
        """Engine, at start-up: create the per-layer SSC counters at zero."""
        for layer in range(num_layers):
            self._ssc.labels(self.model_name, str(layer))

    def declare_routes(self, routes: Iterable[str]) -> None:
        """HTTP layer, at start-up: create the request counters of `routes` at zero (status 200, and
        every status of HTTP_STATUSES for the generation routes)."""
        for route in routes:
            for status in HTTP_STATUSES if route in GENERATION_ROUTES else ("200",):
                self._http.labels(self.model_name, route, status)

    def count_http(self, route: str, status: int) -> None:
        """HTTP layer: one request to `route` (a template such as /v1/models/{model_id}) answered `status`."""
        self._http.labels(self.model_name, route, str(status)).inc()

    def on_queue_time(self, seconds: float) -> None:
        """Engine: a request was scheduled for the first time after `seconds` in the queue."""
        self._queue.labels(self.model_name).observe(seconds)

    def on_preemption(self, n: int = 1) -> None:
        """Engine: `n` sequences were preempted."""
        self._preemptions.labels(self.model_name).inc(n)

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Engine: a prompt of `queried_tokens` was looked up; `hit_tokens` of it were cached."""
        assert 0 <= hit_tokens <= queried_tokens, (hit_tokens, queried_tokens)
        self._prefix_queries.labels(self.model_name).inc(queried_tokens)
        self._prefix_hits.labels(self.model_name).inc(hit_tokens)

    def count_eviction(self, reason: str, n: int = 1) -> None:
        """Engine: `n` checkpoint blocks dropped; `reason` e.g. "unreferenced", "running", "session"."""
        self._evictions.labels(self.model_name, reason).inc(n)

    def count_offload(self, n: int = 1, reason: str = "pressure") -> None:
        """Engine: `n` checkpoint blocks moved to host memory."""
        self._offloads.labels(self.model_name, reason).inc(n)

    def count_ssc_selections(self, layer: int, n: int) -> None:
        """Engine: `n` (sequence, checkpoint) reads in `layer` chosen by the router (SSC top-k or all)."""
        self._ssc.labels(self.model_name, str(layer)).inc(n)

    def count_request_failure(self, reason: str, n: int = 1) -> None:
        """Engine: `n` sequences failed inside a step; `reason` is one of FAILURE_REASONS."""
        self._failures.labels(self.model_name, reason).inc(n)

    def set_stats(self, stats: EngineStats) -> None:
        """Scrape time: refresh the gauges from the engine's counts."""
        name = self.model_name
        self._running.labels(name).set(stats.num_running)
        self._waiting.labels(name).set(stats.num_waiting)
        self._slot_usage.labels(name).set(stats.state_slots_running / max(stats.state_slots_total, 1))
        self._pool_usage.labels(name).set(stats.checkpoint_blocks_running / max(stats.checkpoint_blocks_total, 1))
        free_slots = stats.state_slots_total - stats.state_slots_running - stats.state_slots_parked
        for state, n in (
            ("running", stats.state_slots_running),
            ("parked", stats.state_slots_parked),
            ("free", free_slots),
        ):
            self._slots.labels(name, state).set(n)
        free_blocks = stats.checkpoint_blocks_total - stats.checkpoint_blocks_running - stats.checkpoint_blocks_cached
        for state, n in (
            ("running", stats.checkpoint_blocks_running),
            ("cached", stats.checkpoint_blocks_cached),
            ("free", free_blocks),
        ):
            self._blocks.labels(name, state).set(n)

    def on_slow_step(self, seconds: float) -> None:
        """Async engine: a step took `seconds`, longer than its budget."""
        self._slow_steps.labels(self.model_name).inc()
        self._last_slow_step.labels(self.model_name).set(seconds)

    def track(self, prompt_tokens: int, arrival_time: float | None = None) -> RequestTracker:
        """HTTP layer: start timing one engine request (`arrival_time` from `time.monotonic()`)."""
        return RequestTracker(self, prompt_tokens, time.monotonic() if arrival_time is None else arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


class RequestTracker:
    """Per-request metrics from the stream of deltas of one `GenerateRequest` (all its n choices).

    Records TTFT once (first delta with tokens), the gap between successive token-carrying deltas of
    each choice, and at `finish` the tokens, e2e latency and one `request_success` per choice.
    """

    def __init__(self, metrics: EngineMetrics, prompt_tokens: int, arrival: float) -> None:
        self._m = metrics
        self._arrival = arrival
        self._prompt_tokens = prompt_tokens
        self._generated = 0
        self._usage_completion: int | None = None
        self._last: dict[int, float] = {}
        self._reasons: dict[int, str] = {}
        self._done = False

    def on_delta(self, delta: Delta, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        name = self._m.model_name
        if delta.token_ids:
            if not self._last:
                self._m._ttft.labels(name).observe(now - self._arrival)
            elif delta.index in self._last:
                self._m._itl.labels(name).observe(now - self._last[delta.index])
            self._last[delta.index] = now
            self._generated += len(delta.token_ids)
        if delta.finish_reason is not None:
            self._reasons[delta.index] = delta.finish_reason
        if delta.usage is not None:
            self._prompt_tokens = delta.usage.prompt_tokens
            self._usage_completion = delta.usage.completion_tokens

    def finish(self, n: int, default_reason: str = "abort") -> None:
        """The request is over (finished, failed or abandoned); choices without a finish reason count
        as `default_reason`. Idempotent."""
        if self._done:
            return
        self._done = True
        m, name = self._m, self._m.model_name
        m._prompt_tokens.labels(name).inc(self._prompt_tokens)
        generated = self._usage_completion if self._usage_completion is not None else self._generated
        m._generation_tokens.labels(name).inc(generated)
        m._e2e.labels(name).observe(time.monotonic() - self._arrival)
        for i in range(n):
            m._success.labels(name, self._reasons.get(i, default_reason)).inc()
