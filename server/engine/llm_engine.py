"""The synchronous engine: model, tokenizer, scheduler, runner and per-choice detokenizers.

One step is `plan = scheduler.schedule(); out = runner.execute(plan, sampling); seqs =
scheduler.update(plan, out)`, then the stop rules (stop_rules.py) of every sequence that got a
token, which produce the `Delta`s, and the metrics (metrics_publisher.py). A request with `n`
choices is `n` sequences. Not thread-safe: AsyncEngine drives it from one thread, LLM offline
without threads.

Failures (failures.py): an exception inside a step fails the sequences it concerns with a final
Delta (finish_reason "error", `error` says why), counted by cause in the metrics; their slots and
blocks are freed and the engine goes on. Which sequences: those the runner names in
`RunnerOutput.failed` (one failed stage: a restore, the prefill pass, the decode pass, sampling),
the one whose stop rules raised, or, when nothing narrower is known, every sequence of the step's
plan (for a failed `schedule`, every running sequence and the head of the waiting queue). Nothing is
retried. If the scheduler's invariants no longer hold afterwards, or a block copy failed (the pools
may disagree with the bookkeeping), the scheduler is rebuilt empty: every sequence that had started
fails, those still waiting carry over. The engine is dead (`step` raises EngineDeadError) only when
the device fails a trivial probe after a failed step. A sequence the scheduler cannot make progress
on for `STALL_STEPS` empty plans in a row fails alone ("unschedulable"). A sequence with a grammar
(`params.structured`) fails ("error") if the grammar cannot accept its token.

Async scheduling (`RunnerOptions.async_scheduling`; by default on with the CUDA runner on a CUDA
device, `runner/factory.py`'s `use_async_scheduling`): pipeline.py launches a decode-only step before
the previous one is collected, so `step` then returns the deltas of the step launched by the call
before.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcserve.server.engine.client import EngineStats, GenerateRequest
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.failures import Unschedulable, describe, device_usable, failure_reason
from mcserve.server.engine.metrics_publisher import MetricsPublisher
from mcserve.server.engine.outputs import Delta, TokenLogprob, Usage
from mcserve.server.engine.pipeline import StepPipeline
from mcserve.server.engine.plan import StepPlan
from mcserve.server.engine.prefix_index import engine_root, namespace_root, state_top_k
from mcserve.server.engine.runner.base import Logprobs, RunnerOutput, TransferError
from mcserve.server.engine.runner.factory import RunnerOptions, make_runner, use_async_scheduling
from mcserve.server.engine.runner.prompt_logprobs import PromptLogprob
from mcserve.server.engine.sampler import SamplingRow
from mcserve.server.engine.scheduler import Scheduler
from mcserve.server.engine.sequence import Sequence, SequenceStatus
from mcserve.server.engine.sessions.book import SessionBook, engine_identity, owner_of
from mcserve.server.engine.stop_rules import StopRules
from mcserve.server.engine.structured.grammars import GrammarError, load_grammars, unavailable_error
from mcserve.server.errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    check_context_length,
)
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from mcserve.server.engine.tp.launcher import TPWorkers

log = logging.getLogger(__name__)

# Empty plans in a row, with requests unfinished, after which the stuck sequence fails.
STALL_STEPS = 8
# A runner that holds the router weights back (`keeps_tables`) hands them to the cache this often (and
# whenever the cache must pick a victim).
WEIGHTS_EVERY = 32



@dataclass(slots=True)
class _Choice:
    seq: Sequence
    index: int
    rules: StopRules  # holds the choice's detokenizer
    last: int  # len(seq.token_ids) at which it surely ends (max_tokens or max_model_len)
    scheduled: bool = False
    finished: bool = False
    prompt_lps: dict[int, TokenLogprob] | None = None  # position -> entry, when prompt logprobs are asked


@dataclass(slots=True)
class _Request:
    request: GenerateRequest
    arrival: float  # time.monotonic() at add_request
    choices: list[_Choice] = field(default_factory=list)
    num_finished: int = 0


class LLMEngine:
    def __init__(self, model: MCGatedDeltaNetForCausalLM, tokenizer: Tokenizer, config: EngineConfig, *,
                 ckpt_dtype: torch.dtype | None = None, model_name: str = "model", metrics: Any = None,
                 seed: int | None = None, runner: RunnerOptions | None = None,
                 tensor_parallel: TPWorkers | None = None) -> None:
        """`metrics`: an `EngineMetrics` (server/metrics.py) or None; `runner`: which runner and how;
        `tensor_parallel`: the workers of a tensor-parallel group whose rank 0 `model` is
        (server/engine/tp/)."""
        assert model.spec.segment_size == config.segment_size, (model.spec, config.segment_size)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.num_threads: int | None = None  # intra-op threads the driving thread sets (None: leave torch's)
        self.vocab_size = min(model.cfg.vocab_size, tokenizer.vocab_size)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model.cfg.eos_token_ids)
        tokenizer.prepare_detokenizers()
        grammars = load_grammars(tokenizer.backend.to_str(), self.eos_token_ids)
        self.grammars, self.masks = grammars if grammars is not None else (None, None)  # None: no llguidance
        self.runner = make_runner(model, config, ckpt_dtype=ckpt_dtype, seed=seed, vocab_size=self.vocab_size,
                                  masks=self.masks, options=runner, tensor_parallel=tensor_parallel)
        self.scheduler = self._new_scheduler()
        # h_0 of every prefix is rooted here: cached states are shared only within one model, MC setting
        # and checkpoint dtype (prefix_index.py)
        self._cache_root = engine_root(model.fingerprint(), model.spec, str(ckpt_dtype or model.state_dtype))
        identity = engine_identity(model, model_name, ckpt_dtype or model.state_dtype, self._cache_root)
        self.sessions = SessionBook(identity, config.segment_size, lambda: self.scheduler, lambda: self.runner.pools)
        self.engine_counters: Counter[str] = Counter()
        self.publisher = MetricsPublisher(metrics, self.scheduler.counters, self.runner, model.spec.reads_cache)
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _Choice]] = {}
        self._token_text: dict[int, str] = {}
        self._stalled_steps = 0
        self._out: list[Delta] = []  # deltas of the current step or abort, in order
        self.pipeline: StepPipeline | None = None
        if use_async_scheduling(runner, self.runner, model.device):
            self.pipeline = StepPipeline(self)
        elif runner is not None and runner.async_scheduling:
            log.warning("async scheduling ignored: the %s runs each step to its end (only the CUDA runner"
                        " overlaps steps)", type(self.runner).__name__)
        if metrics is not None and model.spec.reads_cache:
            metrics.declare_layers(model.cfg.num_hidden_layers)  # per-layer SSC counters exist at zero

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, metrics: Any = None, **kwargs: Any) -> LLMEngine:
        """Load model and tokenizer, size the pools from the memory budgets; `kwargs` are EngineArgs."""
        from mcserve.server.engine.args import EngineArgs, engine_config, size_pools
        from mcserve.server.engine.cpu_threads import resolve_threads, use_threads
        from mcserve.server.model.loader import load_model

        args = EngineArgs(**kwargs)
        threads = resolve_threads(args.threads)
        if args.tensor_parallel_size > 1 and args.threads is None and args.resolve_device().type == "cpu":
            threads = max(1, threads // args.tensor_parallel_size)  # every rank computes at once: share the cores
        use_threads(threads)  # the loading thread too; the thread that drives the engine sets it again
        device = args.resolve_device()
        tokenizer = Tokenizer.from_dir(model_dir)
        workers: TPWorkers | None = None
        if args.tensor_parallel_size > 1:
            from mcserve.server.engine.tp.launcher import launch

            workers, model = launch(model_dir, args.tensor_parallel_size, device, args.dtype, args.mc_overrides(),
                                    threads, args.tensor_parallel_timeout_s)
        else:
            model = load_model(model_dir, dtype=args.dtype, device=device, **args.mc_overrides())
        try:
            # with tensor parallelism model.cfg is one rank's: the budgets are per device
            ckpt_dtype = args.resolve_ckpt_dtype(device, model.state_dtype)
            pools = size_pools(args, model.cfg, device, model.dtype, ckpt_dtype, model.state_dtype)
            config = engine_config(args, model.cfg, pools)
            name = args.served_model_name or Path(model_dir).resolve().name
            if workers is not None:
                from mcserve.server.engine.tp.step_message import Setup

                workers.start_serving(Setup(pools.num_state_slots, pools.num_checkpoint_blocks, pools.num_host_blocks,
                                            ckpt_dtype))
            try:
                engine = cls(model, tokenizer, config, ckpt_dtype=ckpt_dtype, model_name=name, metrics=metrics,
                             seed=args.seed, runner=args.runner_options(),
                             tensor_parallel=workers)
            except torch.cuda.OutOfMemoryError as e:
                raise ConfigError(f"cannot allocate {pools.describe()} on {device}: {e}; lower the memory budgets"
                                  " or --max-num-seqs") from None
        except BaseException:
            if workers is not None:
                workers.stop()
            raise
        engine.num_threads = threads
        log.info("engine for %s on %s%s (%s), %d CPU threads, %s: %s", name, device,
                 f" x{args.tensor_parallel_size} (tensor parallel)" if workers is not None else "", model.spec,
                 threads, engine.scheduling, pools.describe())
        return engine

    @property
    def scheduling(self) -> str:
        """Which step loop runs, for the start-up log: "async" (pipeline.py: a decode step is launched
        before the previous one's outputs are processed) or "serial" (each step runs to its end)."""
        return "async scheduling" if self.pipeline is not None else "serial scheduling"

    def close(self) -> None:
        """Release the runner's outside resources (tensor-parallel workers); idempotent."""
        self.runner.close()

    @property
    def metrics(self) -> Any:
        """The EngineMetrics the engine reports to (None: none); settable, e.g. by tests."""
        return self.publisher.metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:
        self.publisher.metrics = metrics

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def counters(self) -> Counter[str]:
        """A copy of the scheduler's counters (prefix hits, evictions, offloads, preemptions, ...) and
        the engine's (steps, prefill_tokens computed, decode_tokens, requests); absent keys are 0."""
        return self.scheduler.counters + self.engine_counters

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    def has_unfinished(self) -> bool:
        """Requests unfinished, or a launched step not collected yet (async scheduling)."""
        return bool(self._requests) or (self.pipeline is not None and self.pipeline.pending is not None)

    def validate(self, request: GenerateRequest) -> None:
        """What a request can get wrong, independent of the engine's state (safe from any thread)."""
        ids, limit = request.prompt_token_ids, self.config.max_model_len
        if len(ids) == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)", param="prompt")
        check_context_length(len(ids), limit)
        bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad!r} is out of range for vocab size {self.vocab_size}",
                                      param="prompt")
        request.params.check_vocab(self.vocab_size)
        spec = request.params.structured
        if spec is not None:
            if self.grammars is None:
                raise unavailable_error(spec)
            self.grammars.check(spec)

    def add_request(self, request: GenerateRequest) -> None:
        """Queue all `n` choices of `request`, or none: InvalidRequestError, ContextLengthError,
        QueueFullError."""
        self.validate(request)
        rid, sp = request.request_id, request.params
        if rid in self._requests:
            raise InvalidRequestError(f"request id {rid!r} is already in flight", param="request_id")
        waiting, limit = len(self.scheduler.waiting), self.config.max_waiting
        if sp.n > limit:  # would wait forever for room: the client's error, not a retry
            raise InvalidRequestError(f"n={sp.n} choices can never fit this server's waiting queue of {limit} "
                                      "sequences; lower n", param="n")
        if waiting + sp.n > limit:
            raise QueueFullError(f"the waiting queue holds {waiting} of {limit} sequences, no room for {sp.n} more;"
                                 " retry later")
        req = _Request(request, time.monotonic())
        arrival = request.arrival_time or time.time()
        root = namespace_root(self._cache_root, state_top_k(self.model.spec, sp.mc_top_k), api_key=request.api_key,
                              cache_salt=request.cache_salt, session_id=request.session_id)
        for i in range(sp.n):
            seq = Sequence(request.prompt_token_ids, request_id=rid, priority=request.priority, arrival_time=arrival,
                           cache_root=root, params=sp)
            detok = self.tokenizer.detokenizer(request.prompt_token_ids, sp.skip_special_tokens, stop=sp.stop,
                                               include_stop_str_in_output=sp.include_stop_str_in_output)
            seq.reuse_prefix = sp.prompt_logprobs is None
            last = min(len(seq.token_ids) + (sp.max_tokens or self.config.max_model_len), self.config.max_model_len)
            req.choices.append(_Choice(seq, i, StopRules(sp, self.eos_token_ids, detok), last,
                                       prompt_lps={} if sp.prompt_logprobs is not None else None))
        added: list[_Choice] = []
        try:
            for c in req.choices:
                if sp.structured is not None:
                    assert self.masks is not None  # validate refused it otherwise
                    self.masks.add(c.seq.seq_id, sp.structured)
                added.append(c)
                self.scheduler.add_request(c.seq)
        except BaseException:  # all or none: take back the choices already queued, then re-raise
            for c in added:
                if self.masks is not None:
                    self.masks.remove(c.seq.seq_id)
                if self.scheduler.get(c.seq.seq_id) is not None:
                    self.scheduler.finish(c.seq.seq_id, "abort")
            raise
        for c in req.choices:
            self._by_seq[c.seq.seq_id] = (req, c)
        self._requests[rid] = req
        self.engine_counters["requests"] += 1

    def abort(self, request_id: str) -> list[Delta]:
        """Finish every unfinished choice with "abort", freeing its slot and blocks now. Returns their
        final deltas ([] for an unknown or finished request)."""
        req = self._requests.get(request_id)
        if req is not None:
            try:
                for c in req.choices:
                    if not c.finished:
                        self._finish(req, c, "abort")
            except Exception as e:  # freeing failed: the bookkeeping cannot be trusted any more
                self._rebuild_scheduler(e)
        return self._take_deltas()

    def step(self) -> list[Delta]:
        """One step, then its deltas. A failure fails the sequences it concerns (module docstring);
        EngineDeadError when the device is unusable."""
        if self.pipeline is not None:
            self.pipeline.step()
        else:
            plan: StepPlan | None = None
            try:
                plan = self.schedule()
                self.apply(plan, self.runner.execute(plan, self._sampling_rows(plan)))
            except EngineDeadError:
                raise
            except Exception as e:  # a failed step fails its sequences, not the engine
                self.step_failed(plan, e)
        try:
            self.publisher.publish(self.engine_counters["steps"])
        except Exception:  # a metrics bug must neither fail requests nor stop the engine: logged
            log.exception("publishing the metrics of step %d failed", self.engine_counters["steps"])
        return self._take_deltas()

    def schedule(self, hold: set[int] | frozenset[int] = frozenset()) -> StepPlan:
        """The next plan (`hold`: decode rows to leave out, Scheduler.schedule), counted."""
        plan = self.scheduler.schedule(hold)
        self._check_progress(plan)
        self._on_scheduled(plan)
        if self.masks is not None:
            self.masks.launch()  # next masks of the guided sequences, computed while the model runs
        return plan

    def apply(self, plan: StepPlan, out: RunnerOutput, advanced: bool = False) -> None:
        """A step's outputs: failed rows, the scheduler's update, the stop rules and deltas.
        advanced: the plan went through `Scheduler.advance` (async scheduling)."""
        self._fail_rows(out.failed)
        self._record_prompt_logprobs(out.prompt_logprobs)
        seqs = self.scheduler.update(plan, out.step, advanced)
        if self.runner.keeps_tables and plan.step % WEIGHTS_EVERY == 0:
            self.scheduler.cache.add_block_weights(self.runner.take_block_weights(self.scheduler.cache.now))
        self._stop_checks(seqs, out.logprobs)

    def _new_scheduler(self, counters: Counter[str] | None = None) -> Scheduler:
        keeps = self.runner.keeps_tables
        sched = Scheduler(self.config, counters, decode_tables=not keeps)
        if keeps:
            sched.cache.weights_source = lambda: self.runner.take_block_weights(sched.cache.now)
        return sched

    def _take_deltas(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _sampling_rows(self, plan: StepPlan) -> Mapping[int, SamplingRow]:
        """Every live sequence's SamplingRow, each built when a runner first asks for it: the torch
        runner asks for every row of the plan, the CUDA runner only for rows new to it (building one
        copies the sequence's output tokens, so building them all would cost O(batch x output) per step)."""
        return _SamplingRows(self)

    def sampling_row(self, seq_id: int) -> SamplingRow:
        req, c = self._by_seq[seq_id]
        sp, seq = req.request.params, c.seq
        wants_prompt = sp.repetition_penalty != 1.0 or (sp.prompt_logprobs is not None and seq.is_prefilling)
        prompt = seq.token_ids[:seq.num_prompt_tokens] if wants_prompt else ()
        return SamplingRow(sp, prompt, seq.output_token_ids, self.eos_token_ids, c.index)

    def _check_progress(self, plan: StepPlan) -> None:
        """Empty plans in a row while requests wait: the scheduler cannot progress on the sequence in
        front (the waiting head; all running ones if none waits). It fails; the others go on."""
        self._stalled_steps = self._stalled_steps + 1 if plan.is_empty and self._requests else 0
        if self._stalled_steps < STALL_STEPS:
            return
        self._stalled_steps = 0
        sched = self.scheduler
        stuck = [sched.waiting[0].seq_id] if sched.waiting else [s.seq_id for s in sched.running]
        log.warning("no progress in %d steps, failing sequences %s: %s", STALL_STEPS, stuck, sched.stats())
        self._fail(stuck, Unschedulable(f"the scheduler could not make progress on this request in {STALL_STEPS}"
                                        f" steps ({sched.stats()})"))

    def _on_scheduled(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for chunk in plan.prefill:
            req, c = self._by_seq[chunk.seq_id]
            if not c.scheduled:
                c.scheduled = True
                self.publisher.on_queue_time(now - req.arrival)
        self.engine_counters["steps"] += 1
        self.engine_counters["prefill_tokens"] += sum(len(c.token_ids) for c in plan.prefill)
        self.engine_counters["decode_tokens"] += len(plan.decode)

    def _stop_checks(self, seqs: list[Sequence], logprobs: Logprobs) -> None:
        """The delta of each sequence that got a token, after its stop rules; one whose stop rules
        raise fails alone. The grammars take the step's tokens first, in one parallel call."""
        masks = self.masks  # empty (falsy) while no sequence has a grammar: nothing per row then
        # a token of the step is the last but its placeholders (pending: async scheduling)
        grammar = masks.accept([(seq.seq_id, seq.token_ids[-1 - seq.num_pending]) for seq in seqs]) if masks else {}
        by_seq, out, running = self._by_seq, self._out, SequenceStatus.RUNNING
        for seq in seqs:  # per-row work of every step: nothing here reads a row's params
            sid = seq.seq_id
            try:
                req, c = by_seq[sid]
                n = len(seq.token_ids) - seq.num_pending
                tok = seq.token_ids[n - 1]
                state = grammar.get(sid)  # its grammar after the token (None: no grammar)
                if state is not None and isinstance(state, GrammarError):
                    self._finish(req, c, "error", tokens=(tok,), error=f"structured output: {state}")
                    continue
                rules = c.rules
                # the scheduler's finish reason, if it just ended the sequence (at max_model_len)
                ended = None if seq.status is running else seq.finish_reason
                text = rules.check(tok, n - seq.num_prompt_tokens, ended, state == "done")
                lp = logprobs.get(sid)
                lps = None if lp is None else (self._logprob(tok, lp),)
                prompt_lps = None if c.prompt_lps is None else self._prompt_logprobs(seq, c)
                if rules.finish_reason is None:
                    out.append(Delta(req.request.request_id, c.index, (tok,), text, lps, None, None, None, None,
                                     prompt_lps))
                else:
                    self._finish(req, c, rules.finish_reason, rules.stop_reason, (tok,), text, lps,
                                 prompt_logprobs=prompt_lps)
            except Exception as e:  # its detokenizer or stop strings: this sequence only
                self._fail([sid], e)

    def _prompt_logprobs(self, seq: Sequence, c: _Choice) -> tuple[TokenLogprob | None, ...] | None:
        """On the first token (after the prefill) of a choice that asks: one entry per prompt token."""
        if c.prompt_lps is None or seq.num_output_tokens != 1:
            return None
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        assert len(c.prompt_lps) == len(prompt) - 1, (len(c.prompt_lps), len(prompt))
        return (None, *(c.prompt_lps[p] for p in range(1, len(prompt))))

    def _finish(self, req: _Request, c: _Choice, reason: str, stop_reason: str | int | None = None,
                tokens: tuple[int, ...] = (), text: str = "", logprobs: tuple[TokenLogprob, ...] | None = None,
                error: str | None = None, prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None) -> None:
        """The choice's last delta; frees what its sequence holds (unless it already finished)."""
        if not c.seq.is_finished:
            self.scheduler.finish(c.seq.seq_id, reason)
        c.seq.drop_pending()  # a step still in flight computed its last token (async scheduling)
        sid, seq = req.request.session_id, c.seq
        if sid is not None and c.index == 0 and reason in ("stop", "length"):  # the session's last turn
            self.sessions.record((owner_of(req.request.api_key), sid), seq.prefix_hashes(self.config.segment_size)[0],
                                 tuple(seq.token_ids[:seq.num_computed_tokens]))
        if self.masks is not None:
            self.masks.remove(c.seq.seq_id)
        c.finished = True
        req.num_finished += 1
        del self._by_seq[c.seq.seq_id]
        usage = None
        if req.num_finished == len(req.choices):
            del self._requests[req.request.request_id]
            usage = Usage(len(req.request.prompt_token_ids), sum(x.seq.num_output_tokens for x in req.choices),
                          req.choices[0].seq.num_cached_tokens)
        self._out.append(Delta(req.request.request_id, c.index, tokens, text, logprobs, reason, stop_reason, usage,
                               error, prompt_logprobs=prompt_logprobs))

    def _fail(self, seq_ids: Iterable[int], error: BaseException) -> None:
        """Finish these sequences (those still unfinished) with "error", freeing their slots and blocks."""
        for seq_id in seq_ids:
            if seq_id in self._by_seq:
                req, c = self._by_seq[seq_id]
                self.publisher.on_failure(failure_reason(error))
                self._finish(req, c, "error", error=describe(error))

    def _fail_rows(self, failed: dict[int, Exception]) -> None:
        """The sequences the runner could not run (their stage failed)."""
        if failed:
            error = next(iter(failed.values()))
            log.error("step %d: %d sequences failed", self.engine_counters["steps"], len(failed), exc_info=error)
            self._check_device(error)
            for seq_id, e in failed.items():
                self._fail([seq_id], e)

    def step_failed(self, plan: StepPlan | None, error: Exception) -> None:
        """A step raised: fail what it concerned (module docstring), then check the bookkeeping."""
        log.error("step %d failed", self.engine_counters["steps"], exc_info=error)
        self._check_device(error)
        if isinstance(error, TransferError):
            self._rebuild_scheduler(error)
            return
        sched = self.scheduler
        if plan is not None:
            concerned = [r.seq_id for r in plan.decode] + [c.seq_id for c in plan.prefill]
        else:  # schedule() itself failed: what it was scheduling
            concerned = [s.seq_id for s in sched.running] + [s.seq_id for s in sched.waiting[:1]]
        try:
            self._fail(concerned, error)
            sched.check()
        except Exception as e:  # the bookkeeping is inconsistent
            self._rebuild_scheduler(e)

    def _check_device(self, error: BaseException) -> None:
        if not device_usable(self.model.device):
            raise EngineDeadError(f"the device is unusable after a failed step ({describe(error)})") from error

    def _rebuild_scheduler(self, error: BaseException) -> None:
        """Start over with an empty scheduler: no slot or block held, nothing cached (the runner never
        reads a slot or block before the plan writes it). Sequences that had started fail; those still
        waiting (never scheduled, holding nothing) carry over in their order."""
        log.error("rebuilding the scheduler after: %s", describe(error))
        old = self.scheduler
        for req, c in list(self._by_seq.values()):
            if c.seq.status is not SequenceStatus.WAITING:
                c.seq.status = SequenceStatus.FINISHED_ERROR  # not freed through `old`: it cannot be trusted
                self.publisher.on_failure(failure_reason(error))
                self._finish(req, c, "error", error=describe(error))
        self.scheduler = self._new_scheduler(old.counters)
        self.scheduler.cache.released_elsewhere(old.cache.open_tables())  # the tables a runner still keeps
        for seq in old.waiting:
            if seq.status is SequenceStatus.WAITING:
                seq.slot, seq.num_computed_tokens, seq.num_prefill_tokens = None, 0, 0
                self.scheduler.add_request(seq)
        self.engine_counters["scheduler_rebuilds"] += 1

    def _record_prompt_logprobs(self, scored: dict[int, tuple[int, list[PromptLogprob]]]) -> None:
        """Keep each prompt position's entry once (a recomputed prefill, after preemption, scores again)."""
        for seq_id, (first, entries) in scored.items():
            _, c = self._by_seq[seq_id]
            assert c.prompt_lps is not None
            ids = c.seq.token_ids
            for pos, (lp, rank, top) in enumerate(entries, start=first):
                if pos not in c.prompt_lps:
                    c.prompt_lps[pos] = TokenLogprob(ids[pos], self._text_of(ids[pos]), lp,
                                                     tuple((t, self._text_of(t), v) for t, v in top), rank)

    def _logprob(self, tok: int, lp: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        chosen, top = lp
        return TokenLogprob(tok, self._text_of(tok), chosen, tuple((t, self._text_of(t), v) for t, v in top))

    def _text_of(self, tok: int) -> str:
        s = self._token_text.get(tok)
        if s is None:
            s = self._token_text[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return s


class _SamplingRows(Mapping[int, SamplingRow]):
    """seq_id -> SamplingRow of the engine's live sequences, built on first access within one step."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._rows: dict[int, SamplingRow] = {}

    def __getitem__(self, seq_id: int) -> SamplingRow:
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = self._engine.sampling_row(seq_id)
        return row

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._engine._by_seq

    def __iter__(self) -> Iterator[int]:
        return iter(self._engine._by_seq)

    def __len__(self) -> int:
        return len(self._engine._by_seq)
