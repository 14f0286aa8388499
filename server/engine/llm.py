"""Offline generation for scripts and benchmarks: the synchronous engine, no threads, no HTTP.

    llm = LLM("path/to/model", device="cpu", max_num_seqs=16)
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.llm_engine import LLMEngine
from mcserve.server.engine.outputs import Delta, TokenLogprob, Usage
from mcserve.server.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class CompletionOutput:
    """One choice: everything its deltas carried, concatenated."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    usage: Usage | None = None
    first_token_s: float | None = None  # seconds from the start of generate() to its first token
    finished_s: float | None = None  # seconds from the start of generate() to its last delta


class LLM:
    """`LLM(model_dir, **engine_args)`; engine_args are EngineArgs (server/engine/args.py)."""

    def __init__(self, model_dir: str | Path, **engine_args: Any) -> None:
        self.engine = LLMEngine.from_model_dir(model_dir, **engine_args)  # sets this thread's torch threads
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer, llm._ids = engine, engine.tokenizer, itertools.count()
        return llm

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 session_id: str | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, encoded with special tokens, or token ids); outputs in
        prompt order. Requests enter the engine as its waiting queue makes room."""
        params = SamplingParams() if params is None else params
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        requests = []
        for prompt, p in zip(prompts, plist, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            requests.append(GenerateRequest(f"offline-{next(self._ids)}", tuple(ids), p, session_id=session_id))
        for r in requests:
            self.engine.validate(r)
        outputs = {r.request_id: RequestOutput(r.request_id, list(r.prompt_token_ids),
                                               [CompletionOutput(i) for i in range(r.params.n)]) for r in requests}
        engine, pending = self.engine, list(reversed(requests))
        start = time.perf_counter()
        while pending or engine.has_unfinished():
            limit = engine.config.max_waiting
            # A request too large for the queue even when the engine is idle raises QueueFullError.
            while pending and (len(engine.scheduler.waiting) + pending[-1].params.n <= limit
                               or not engine.has_unfinished()):
                engine.add_request(pending.pop())
            for delta in engine.step():
                _apply(outputs[delta.request_id], delta, time.perf_counter() - start)
        return [outputs[r.request_id] for r in requests]


def _apply(out: RequestOutput, delta: Delta, now: float) -> None:
    c = out.outputs[delta.index]
    if delta.token_ids and out.first_token_s is None:
        out.first_token_s = now
    c.text += delta.text
    c.token_ids.extend(delta.token_ids)
    if delta.logprobs is not None:
        c.logprobs = (c.logprobs or []) + list(delta.logprobs)
    if delta.finish_reason is not None:
        c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
        out.finished_s = now
    if delta.usage is not None:
        out.usage = delta.usage
