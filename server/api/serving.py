"""What every generation endpoint shares: the engine, tokenizer, settings and metrics of one app, and
the checks between a parsed body and a `GenerateRequest` (model name, readiness, context length,
token ids)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mcserve.server.api.errors import EngineNotReadyError, invalid_request_from_validation
from mcserve.server.api.middleware import API_KEY_SCOPE_KEY
from mcserve.server.api.protocol import PromptTokensDetails, UsageInfo
from mcserve.server.api.streaming import ChunkWriter, ClientDisconnected, EngineRun, sse_response, unless_disconnected
from mcserve.server.engine.client import EngineClient, GenerateRequest
from mcserve.server.engine.outputs import Usage
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.errors import ContextLengthError, InvalidRequestError, NotFoundError
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from mcserve.server.text.chat import ChatTokenizer

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """One prompt, tokenized and checked: `max_tokens` is the output cap after defaulting."""

    token_ids: tuple[int, ...]
    max_tokens: int | None


@dataclass(frozen=True)
class ServingContext:
    engine: EngineClient
    tokenizer: ChatTokenizer
    settings: ApiSettings
    metrics: EngineMetrics

    @property
    def model_name(self) -> str:
        """The name clients use (settings override the engine's)."""
        return self.settings.served_model_name or self.engine.model_name

    def check_ready(self) -> None:
        if not self.engine.is_ready:
            raise EngineNotReadyError()

    def check_model(self, model: str | None) -> None:
        """`model` may be omitted; otherwise it must be the served name (or the engine's own)."""
        if model is not None and model not in (self.model_name, self.engine.model_name):
            raise NotFoundError(
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range for vocab size {vocab}", param=param)

    def prepare(
        self, ids: Sequence[int], requested_max_tokens: int | None, *, prompt_param: str, max_tokens_param: str
    ) -> PreparedPrompt:
        """Checks that the prompt fits the context with at least one output token, and that
        prompt + max_tokens fits; `max_tokens=None` becomes all the room left."""
        limit, n = self.engine.max_model_len, len(ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)", param=prompt_param)
        if n >= limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {n} tokens "
                f"(at least one token must be left for the output); shorten the prompt",
                param=prompt_param,
            )
        room = limit - n
        if requested_max_tokens is not None and requested_max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but {n + requested_max_tokens} "
                f"tokens were requested ({n} in the prompt + {requested_max_tokens} in {max_tokens_param}); "
                f"shorten the prompt or lower {max_tokens_param}",
                param=max_tokens_param,
            )
        return PreparedPrompt(tuple(ids), room if requested_max_tokens is None else requested_max_tokens)

    def check_params(self, params: SamplingParams) -> None:
        params.check_vocab(self.tokenizer.vocab_size)

    def engine_run(
        self,
        request_id: str,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        body: BaseModel,
        http: Request,
    ) -> EngineRun:
        """One `GenerateRequest` per prompt (ids `request_id` or `request_id-k`), not yet started."""
        now, mono = time.time(), time.monotonic()
        priority = getattr(body, "priority", None) or 0
        requests, trackers = [], []
        for k, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{k}"
            requests.append(
                GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=prompt.token_ids,
                    params=p,
                    priority=priority,
                    session_id=getattr(body, "session_id", None),
                    api_key=http.scope.get(API_KEY_SCOPE_KEY),
                    arrival_time=now,
                )
            )
            trackers.append(self.metrics.track(len(prompt.token_ids), arrival_time=mono))
        return EngineRun(self.engine, requests, trackers)


async def parse_body(http: Request, model: type[M]) -> M:
    """Strict JSON -> `model`; any problem (bad JSON or UTF-8, wrong type or value) is a 400."""
    raw = await http.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_request_from_validation(list(e.errors())) from None


def usage_info(usages: Sequence[Usage]) -> UsageInfo:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(u.cached_tokens for u in usages)),
    )


class UsageCounter:
    """Usage per engine request: the engine's (last delta) when given, else counted here."""

    def __init__(self, prompt_lens: Sequence[int]) -> None:
        self._prompt = list(prompt_lens)
        self._counted = [0] * len(prompt_lens)
        self._given: list[Usage | None] = [None] * len(prompt_lens)

    def add(self, k: int, num_tokens: int, usage: Usage | None) -> None:
        self._counted[k] += num_tokens
        if usage is not None:
            self._given[k] = usage

    def total(self) -> UsageInfo:
        return usage_info(
            [
                g if g is not None else Usage(p, c)
                for g, p, c in zip(self._given, self._prompt, self._counted, strict=True)
            ]
        )


async def respond(
    ctx: ServingContext,
    http: Request,
    run: EngineRun,
    *,
    stream: bool,
    writer: ChunkWriter,
    collect: Callable[[], Awaitable[BaseModel]],
) -> Response:
    """Start `run`, then stream it as SSE or answer with `collect()`'s body. Either way the client
    leaving aborts the run; errors before the first token propagate as HTTP errors."""
    try:
        if stream:
            await unless_disconnected(http.receive, run.start())
            return sse_response(run, writer, ctx.settings.sse_ping_s)
        body = await unless_disconnected(http.receive, collect())
    except ClientDisconnected:
        await run.close("abort")
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
    except BaseException:
        await run.close("error")
        raise
    return JSONResponse(body.model_dump(mode="json"))
