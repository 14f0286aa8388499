"""What every generation endpoint shares: the engine, tokenizer, settings and metrics of one app, and
the steps between the bytes of a request and a `GenerateRequest`: readiness, admission (admission.py),
Content-Type, strict JSON (no duplicate keys), model name, prompt text -> token ids off the event loop
within the context bound, context length, token ids."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mcserve.server.api.admission import Admission, Ticket
from mcserve.server.api.drain import Drain
from mcserve.server.api.errors import (
    EngineNotReadyError,
    ServerDrainingError,
    UnsupportedMediaTypeError,
    invalid_request_from_validation,
)
from mcserve.server.api.limits import check_prompt_bytes, check_raw_body
from mcserve.server.api.middleware import API_KEY_SCOPE_KEY
from mcserve.server.api.protocol import PromptTokensDetails, UsageInfo
from mcserve.server.api.streaming import (
    LOGGED_CHARS,
    ChunkWriter,
    ClientDisconnected,
    EngineRun,
    sse_response,
    unless_disconnected,
)
from mcserve.server.api.text_worker import TextWorker
from mcserve.server.engine.client import EngineClient, GenerateRequest
from mcserve.server.engine.outputs import Usage
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.errors import EngineDeadError, InvalidRequestError, NotFoundError, check_context_length
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from mcserve.server.text.chat import ChatTokenizer, render_chat

M = TypeVar("M", bound=BaseModel)
logger = logging.getLogger("mcserve.api")

SESSION_HEADER = "X-Session-Id"
MAX_SESSION_ID_LEN = 256  # = the body field's max_length (protocol.py)


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
    drain: Drain = field(default_factory=Drain)
    text: TextWorker = field(default_factory=TextWorker)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "admission", Admission(self.engine))

    @property
    def model_name(self) -> str:
        """The name clients use (settings override the engine's)."""
        return self.settings.served_model_name or self.engine.model_name

    @property
    def tool_call_parser(self) -> str:
        """The tool-call syntax: the setting, else the tokenizer's config, else Hermes ("none" = never parse)."""
        return self.settings.tool_call_parser or getattr(self.tokenizer, "tool_call_parser", None) or "hermes"

    def check_ready(self) -> None:
        """503 unless ready, saying why: loading (retry soon), draining (go elsewhere), dead."""
        if self.drain.draining:
            raise ServerDrainingError()
        if not self.engine.is_ready:
            health = self.engine.health()
            if health.state == "dead":
                raise EngineDeadError(
                    f"{health.error or 'the engine is not running'}; restart the server", code="engine_dead"
                )
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
        prompt + max_tokens fits; `max_tokens=None` becomes `settings.default_max_tokens`, or the room
        left if that is less."""
        limit, n = self.engine.max_model_len, len(ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)", param=prompt_param)
        check_context_length(n, limit, param=prompt_param, max_tokens=requested_max_tokens,
                             max_tokens_param=max_tokens_param)
        room = limit - n
        if requested_max_tokens is None:
            return PreparedPrompt(tuple(ids), min(room, self.settings.default_max_tokens))
        return PreparedPrompt(tuple(ids), requested_max_tokens)

    def _prompt_ids(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        check_prompt_bytes(text, self.engine.max_model_len, getattr(self.tokenizer, "max_token_bytes", None), param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _chat_ids(self, messages: Sequence[Any], add_generation_prompt: bool, tools: list | None) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added (see text/chat.py).
        text = render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self._prompt_ids(text, False, "messages")

    async def text_prompt_ids(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of a text prompt, encoded off the event loop; ContextLengthError first if the
        text has too many bytes to fit in any tokenization."""
        return await self.text.run(self._prompt_ids, text, add_special_tokens, param)

    async def chat_prompt_ids(
        self, messages: Sequence[Any], *, add_generation_prompt: bool, tools: list | None = None
    ) -> list[int]:
        """The rendered conversation's token ids; rendering and encoding run off the event loop."""
        return await self.text.run(self._chat_ids, messages, add_generation_prompt, tools)

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
        session_id = request_session_id(getattr(body, "session_id", None), http.headers.get(SESSION_HEADER))
        requests, trackers = [], []
        for k, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{k}"
            requests.append(
                GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=prompt.token_ids,
                    params=p,
                    priority=priority,
                    session_id=session_id,
                    cache_salt=getattr(body, "cache_salt", None),
                    api_key=http.scope.get(API_KEY_SCOPE_KEY),
                    arrival_time=now,
                )
            )
            trackers.append(self.metrics.track(len(prompt.token_ids), arrival_time=mono))
        if self.settings.log_requests:
            for r in requests:
                logger.info(
                    "request %s: %d prompt tokens, prompt %r, params %s",
                    r.request_id,
                    len(r.prompt_token_ids),
                    self.tokenizer.decode(r.prompt_token_ids)[:LOGGED_CHARS],
                    r.params,
                )
        return self.drain.track(EngineRun(self.engine, requests, trackers, log_requests=self.settings.log_requests))


def request_session_id(body_value: str | None, header_value: str | None) -> str | None:
    """The conversation's session: from the `X-Session-Id` header (what a router hashes on) or the
    body's `session_id`. Both may be given but must then be equal, so a request never reaches one
    replica routed by one id while naming another cache."""
    if header_value is not None:
        header_value = header_value.strip()
        if not header_value or len(header_value) > MAX_SESSION_ID_LEN:
            raise InvalidRequestError(
                f"the {SESSION_HEADER} header must be 1 to {MAX_SESSION_ID_LEN} characters, got {len(header_value)}",
                param=SESSION_HEADER,
                code="invalid_session_id",
            )
    if header_value is not None and body_value is not None and header_value != body_value:
        raise InvalidRequestError(
            f"the {SESSION_HEADER} header ({header_value!r}) and the body's session_id ({body_value!r}) differ; "
            f"send one, or the same value in both",
            param="session_id",
            code="session_id_conflict",
        )
    return header_value if header_value is not None else body_value


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def parse_json(raw: bytes, model: type[M], max_model_len: int) -> M:
    """Strict JSON -> `model`; any problem is a 400: bad JSON or UTF-8, a key twice in one object (which
    value a parser keeps differs between parsers, so a proxy and this server could read different
    requests), too many items for the limits (checked before pydantic validates them), wrong type or
    value. The first parse is the standard library's; its syntax errors are left to pydantic, whose
    messages name the position."""
    try:
        check_raw_body(json.loads(raw, object_pairs_hook=_unique_keys), max_model_len)
    except _DuplicateKey as e:
        raise InvalidRequestError(f"duplicate key {e.key!r} in a JSON object", code="duplicate_key") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply", code="invalid_json") from None
    except ValueError:
        pass
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_request_from_validation(list(e.errors())) from None


def check_content_type(http: Request) -> None:
    """JSON only (415 otherwise). A browser page can send text/plain or a form to any origin without a
    CORS preflight; requiring application/json turns such a drive-by request into an error."""
    media = http.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaTypeError(media or None)


async def parse_body(ctx: ServingContext, http: Request, model: type[M]) -> M:
    """Content-Type, then the body (its size bounded by the middleware), parsed off the event loop."""
    check_content_type(http)
    raw = await http.body()
    return await ctx.text.run(parse_json, raw, model, ctx.engine.max_model_len)


async def admitted(
    ctx: ServingContext, http: Request, handle: Callable[[ServingContext, Request, Ticket], Awaitable[Response]]
) -> Response:
    """A generation endpoint: readiness, then `handle` under an admission ticket, given back however
    it ends (`respond` gives it back earlier, once the engine has queued the request)."""
    ctx.check_ready()
    with ctx.admission.admit() as ticket:
        return await handle(ctx, http, ticket)


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
    ticket: Ticket,
    *,
    stream: bool,
    writer: ChunkWriter,
    collect: Callable[[], Awaitable[BaseModel]],
) -> Response:
    """Start `run` (then `ticket` is given back: the engine counts its sequences as waiting), then
    stream it as SSE or answer with the body `collect()` makes of the started run. Either way the
    client leaving aborts the run; errors before the first token propagate as HTTP errors."""

    async def start() -> None:
        await run.start()
        ticket.release()

    async def start_and_collect() -> BaseModel:
        await start()
        return await collect()

    try:
        if stream:
            await unless_disconnected(http.receive, start())
            return sse_response(run, writer, ctx.settings.sse_ping_s)
        body = await unless_disconnected(http.receive, start_and_collect())
    except ClientDisconnected:
        await run.close("abort")
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
    except BaseException:
        await run.close("error")
        raise
    return JSONResponse(body.model_dump(mode="json"))
