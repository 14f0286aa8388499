"""A deterministic `EngineClient` for the HTTP tests: no model, letters as tokens.

Choice i of a request emits the letters `start + step + 5*i` (mod 26), where `start` depends on the
prompt and the seed, until max_tokens ("length") or a stop string ("stop"). Markers in the prompt
text switch behaviours:

  [[slow]]     one token per `slow_step_s` (for disconnect tests)
  [[paced]]    one token per `paced_step_s` (so that concurrent requests overlap)
  [[eos]]      the third token is EOS: finish "stop"
  [[error]]    the third step yields a finish_reason "error" delta
  [[raise]]    the third step raises RuntimeError (an engine bug mid-stream)
  [[crash]]    raises RuntimeError before the first delta
  [[invalid]]  raises InvalidRequestError before the first delta (engine-side validation)

More than `max_inflight` concurrent requests raise QueueFullError. `max_waiting` and `max_num_seqs` are the
bounds the HTTP side admits against, `num_waiting` (settable) the waiting count the fake reports; its
running count is the requests in flight. Aborts and early closes are
recorded for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from mcserve.server.engine.client import EngineHealth, EngineStats, GenerateRequest
from mcserve.server.engine.outputs import Delta, TokenLogprob, Usage
from mcserve.server.errors import ContextLengthError, InvalidRequestError, QueueFullError
from tests.server.api.tiny_tokenizer import EOS, TinyTokenizer


class FakeEngine:
    def __init__(
        self,
        tokenizer: TinyTokenizer,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 512,
        max_inflight: int = 256,
        max_waiting: int = 1024,
        max_num_seqs: int = 0,
        step_s: float = 0.0,
        slow_step_s: float = 0.05,
        paced_step_s: float = 0.01,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.max_num_seqs = max_num_seqs
        self.num_waiting = 0
        self.step_s = step_s
        self.slow_step_s = slow_step_s
        self.paced_step_s = paced_step_s
        self.peak_inflight = 0
        self.ready = True
        self.dead_error: str | None = None  # set: the engine reports itself dead
        self.inflight: set[str] = set()
        self.seen: dict[str, GenerateRequest] = {}
        self.aborted: dict[str, float] = {}  # request id -> time.monotonic() of the first abort call
        self.closed_early: dict[str, int] = {}  # request id -> tokens produced when the iterator was closed
        self.completed: set[str] = set()

    @property
    def is_ready(self) -> bool:
        return self.ready and self.dead_error is None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.inflight),
            num_waiting=self.num_waiting,
            state_slots_running=len(self.inflight),
            state_slots_parked=0,
            state_slots_total=self.max_inflight,
            checkpoint_blocks_running=0,
            checkpoint_blocks_cached=0,
            checkpoint_blocks_total=64,
        )

    def health(self) -> EngineHealth:
        if self.dead_error is not None:
            return EngineHealth("dead", self.dead_error, slow_step_s=10.0)
        return EngineHealth("ready" if self.ready else "loading", slow_step_s=10.0)

    async def abort(self, request_id: str) -> None:
        self.aborted.setdefault(request_id, time.monotonic())

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        params, prompt = request.params, request.prompt_token_ids
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise ContextLengthError(f"{len(prompt)} + {params.max_tokens} > {self.max_model_len}")
        text = self.tokenizer.decode(prompt)
        if "[[invalid]]" in text:
            raise InvalidRequestError("the fake engine refuses this prompt", param="prompt")
        if len(self.inflight) >= self.max_inflight:
            raise QueueFullError(
                f"{len(self.inflight)} requests in flight (limit {self.max_inflight})", retry_after_s=2
            )
        if "[[crash]]" in text:
            raise RuntimeError("fake engine crashed before the first token")
        self.seen[request.request_id] = request
        self.inflight.add(request.request_id)
        self.peak_inflight = max(self.peak_inflight, len(self.inflight))
        step_s = self.step_s
        if "[[slow]]" in text or "[[paced]]" in text:
            step_s = self.slow_step_s if "[[slow]]" in text else self.paced_step_s
        start = (sum(prompt) + (params.seed or 0)) % 26
        n, max_tokens = params.n, params.max_tokens or (self.max_model_len - len(prompt))
        texts = [""] * n
        done = [False] * n
        produced = 0
        try:
            for step in range(max_tokens):
                await asyncio.sleep(step_s)
                if step == 2 and "[[raise]]" in text:
                    raise RuntimeError("fake engine exploded mid-stream")
                for i in range(n):
                    if done[i]:
                        continue
                    if step == 2 and "[[error]]" in text:
                        done = [True] * n
                        yield Delta(request.request_id, i, (), "", finish_reason="error", error="fake failure")
                        return
                    tid, piece, finish, stop_reason = self._next(params, texts[i], start, step, i, text)
                    texts[i] += piece
                    produced += 1
                    if finish is None and step == max_tokens - 1:
                        finish = "length"
                    done[i] = finish is not None
                    usage = None
                    if all(done):
                        usage = Usage(len(prompt), produced, cached_tokens=len(prompt) // 2)
                    yield Delta(
                        request.request_id,
                        i,
                        (tid,),
                        piece,
                        logprobs=self._logprobs(params, tid, step),
                        finish_reason=finish,
                        stop_reason=stop_reason,
                        usage=usage,
                    )
                if all(done):
                    return
        finally:
            self.inflight.discard(request.request_id)
            if all(done):
                self.completed.add(request.request_id)
            else:
                self.closed_early[request.request_id] = produced

    def _next(self, params, so_far: str, start: int, step: int, i: int, prompt_text: str):
        if step == 2 and "[[eos]]" in prompt_text and not params.ignore_eos:
            return EOS, "", "stop", None
        letter = chr(ord("a") + (start + step + 5 * i) % 26)
        tid = self.tokenizer.encode(letter, add_special_tokens=False)[0]
        for s in params.stop:
            if s in so_far + letter:
                return tid, letter if params.include_stop_str_in_output else "", "stop", s
        return tid, letter, None, None

    def _logprobs(self, params, tid: int, step: int) -> tuple[TokenLogprob, ...] | None:
        if params.logprobs is None:
            return None
        lp = -0.25 - 0.01 * step
        top = tuple((tid + j, self.tokenizer.token_text(tid + j), lp - j) for j in range(params.logprobs))
        return (TokenLogprob(tid, self.tokenizer.token_text(tid), lp, top),)
