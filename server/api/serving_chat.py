"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from functools import partial

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from mcserve.server.api.admission import Ticket
from mcserve.server.api.limits import check_messages, check_sampling_limits
from mcserve.server.api.logprobs import TokenBytesFn, chat_logprobs, vllm_prompt_logprobs
from mcserve.server.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    PromptLogprobs,
)
from mcserve.server.api.request_id import request_id as request_id_of
from mcserve.server.api.serving import ServingContext, UsageCounter, parse_body, respond
from mcserve.server.api.streaming import EngineRun, consume
from mcserve.server.api.structured import structured_spec
from mcserve.server.api.tool_calls import HermesToolParser
from mcserve.server.api.tool_choice import forced_tool_spec, parses_tool_calls, rendered_tools
from mcserve.server.engine.outputs import Delta
from mcserve.server.errors import InvalidRequestError


class ChatChunkWriter:
    """Stream chunks: a role chunk per choice, then one chunk per delta (the last of a choice carries
    its finish_reason), then the usage chunk with `choices: []` when the client asked for it. vLLM's
    `prompt_logprobs`, when asked, ride on the first chunk with a token (the prompt is every choice's)."""

    def __init__(self, request_id: str, model: str, n: int, prompt_len: int, include_usage: bool,
                 token_bytes: TokenBytesFn, tool_calls: bool = False, prompt_logprobs: int | None = None) -> None:
        """`tool_calls`: parse each choice's text for tool calls (tools given, tool_choice not "none");
        `prompt_logprobs`: alternatives per prompt token (None: not asked)."""
        self.request_id, self.model, self.n = request_id, model, n
        self.token_bytes = token_bytes
        self.prompt_logprobs = prompt_logprobs
        self._prompt_sent = False
        self.include_usage = include_usage
        self.created = int(time.time())
        self.usage = UsageCounter([prompt_len])
        self.parsers = [HermesToolParser() for _ in range(n)] if tool_calls else None

    def _chunk(self, choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices, **extra)  # type: ignore[arg-type]

    def opening(self) -> list[BaseModel]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(self.n)
        ]

    def on_delta(self, k: int, delta: Delta) -> list[BaseModel]:
        self.usage.add(k, len(delta.token_ids), delta.usage)
        text, calls, finish = delta.text, [], delta.finish_reason
        if self.parsers is not None:
            parser = self.parsers[delta.index]
            text, calls = parser.feed(text)
            if finish is not None:
                more, last = parser.finish()
                text, calls = text + more, calls + last
                finish = tool_finish_reason(finish, parser)
        scored = self._scored_prompt(delta)
        if not text and not calls and finish is None and not delta.logprobs and scored is None:
            return []
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=text or None, tool_calls=calls or None),
            logprobs=chat_logprobs(delta.logprobs, self.token_bytes),
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return [self._chunk([choice], prompt_logprobs=scored)]

    def _scored_prompt(self, delta: Delta) -> PromptLogprobs | None:
        """The prompt's logprobs, from the first delta that brings them (each choice's first does)."""
        if delta.prompt_logprobs is None or self.prompt_logprobs is None or self._prompt_sent:
            return None
        self._prompt_sent = True
        return vllm_prompt_logprobs(delta.prompt_logprobs, self.prompt_logprobs, self.token_bytes)

    def closing(self) -> list[BaseModel]:
        return [self._chunk([], usage=self.usage.total())] if self.include_usage else []


def tool_finish_reason(reason: str, parser: HermesToolParser) -> str:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if reason == "stop" and parser.calls else reason


def _message(text: str, tool_calls: bool) -> tuple[AssistantMessage, HermesToolParser | None]:
    if not tool_calls:
        return AssistantMessage(content=text), None
    parser = HermesToolParser()
    content, _ = parser.feed(text)
    content += parser.finish()[0]
    calls = parser.calls or None
    return AssistantMessage(content=content or (None if calls else ""), tool_calls=calls), parser


async def _collect(
    run: EngineRun, body: ChatCompletionRequest, request_id: str, model: str, prompt_len: int, parse_tools: bool,
    token_bytes: TokenBytesFn,
) -> ChatCompletionResponse:
    n = run.requests[0].params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[ChatTokenLogprob] | None] = [[] if body.logprobs else None for _ in range(n)]
    finish: list[Delta | None] = [None] * n
    scored: PromptLogprobs | None = None
    usage = UsageCounter([prompt_len])

    def on_delta(k: int, delta: Delta) -> None:
        nonlocal scored
        usage.add(k, len(delta.token_ids), delta.usage)
        texts[delta.index].append(delta.text)
        if delta.logprobs is not None and logprobs[delta.index] is not None:
            lp = chat_logprobs(delta.logprobs, token_bytes)
            logprobs[delta.index].extend(lp.content)  # type: ignore[union-attr]
        if delta.finish_reason is not None:
            finish[delta.index] = delta
        if delta.prompt_logprobs is not None and body.prompt_logprobs is not None and scored is None:
            scored = vllm_prompt_logprobs(delta.prompt_logprobs, body.prompt_logprobs, token_bytes)

    await consume(run, on_delta)
    choices = []
    for i in range(n):
        message, parser = _message("".join(texts[i]), parse_tools)
        reason = finish[i].finish_reason if finish[i] else None
        choices.append(ChatChoice(
            index=i,
            message=message,
            logprobs=None if logprobs[i] is None else ChatLogprobs(content=logprobs[i]),
            finish_reason=tool_finish_reason(reason, parser) if reason and parser else reason,
            stop_reason=finish[i].stop_reason if finish[i] else None,
        ))
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage.total(),
                                  prompt_logprobs=scored)


async def create_chat_completion(ctx: ServingContext, http: Request, ticket: Ticket) -> Response:
    """Under `ticket` (serving.py's `admitted`)."""
    body = await parse_body(ctx, http, ChatCompletionRequest)
    check_sampling_limits(body)
    check_messages(body.messages)
    ctx.check_model(body.model)
    ticket.resize(body.n or 1)  # before the template and the tokenizer run
    ids = await ctx.chat_prompt_ids(
        body.messages,
        add_generation_prompt=body.add_generation_prompt is not False,
        tools=rendered_tools(body),
    )
    prompt = ctx.prepare(
        ids, body.requested_max_tokens, prompt_param="messages", max_tokens_param=body.max_tokens_field
    )
    parse_tools = parses_tool_calls(body) and ctx.tool_call_parser == "hermes"
    forced = forced_tool_spec(body)
    if forced is not None and not parse_tools:
        raise InvalidRequestError(f"tool_choice {body.tool_choice!r} needs a tool-call parser; this server runs "
                                  f"with --tool-call-parser {ctx.tool_call_parser}", param="tool_choice")
    params = body.to_sampling_params(max_tokens=prompt.max_tokens, structured=structured_spec(body, forced))
    ctx.check_params(params)
    request_id = f"chatcmpl-{request_id_of(http.scope)}"
    run = ctx.engine_run(request_id, [prompt], [params], body, http)
    writer = ChatChunkWriter(request_id, ctx.model_name, params.n, len(ids), body.include_usage,
                             ctx.tokenizer.token_bytes, tool_calls=parse_tools, prompt_logprobs=body.prompt_logprobs)
    collect = partial(_collect, run, body, request_id, ctx.model_name, len(ids), parse_tools, ctx.tokenizer.token_bytes)
    return await respond(ctx, http, run, ticket, stream=bool(body.stream), writer=writer, collect=collect)
