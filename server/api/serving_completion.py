"""POST /v1/completions: text or token-id prompts, one or several per request.

Choice `index` is `prompt_index * n + choice` (as OpenAI numbers them). The non-streaming body is
the stream's chunks merged, so both paths share one writer.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from mcserve.server.api.admission import Ticket
from mcserve.server.api.limits import check_sampling_limits
from mcserve.server.api.logprobs import TextOffsets, TokenBytesFn, completion_logprobs, vllm_prompt_logprobs
from mcserve.server.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from mcserve.server.api.request_id import request_id as request_id_of
from mcserve.server.api.serving import PreparedPrompt, ServingContext, UsageCounter, parse_body, respond
from mcserve.server.api.streaming import EngineRun, consume
from mcserve.server.api.structured import structured_spec
from mcserve.server.engine.outputs import Delta, TokenLogprob
from mcserve.server.text.token_bytes import display_token


class CompletionChunkWriter:
    """`echo`: per prompt, its text, sent before the first output; `prompt_ids`: per prompt, its ids
    (scored when `echo_logprobs` is set: echo + logprobs); `prompt_logprobs`: vLLM's extra, k or None."""

    def __init__(
        self, request_id: str, model: str, n: int, prompt_ids: list[tuple[int, ...]], echo: list[str] | None,
        include_usage: bool, token_bytes: TokenBytesFn, *, special_ids: frozenset[int] = frozenset(),
        echo_logprobs: int | None = None, prompt_logprobs: int | None = None,
    ) -> None:
        self.request_id, self.model, self.n = request_id, model, n
        self.echo = echo
        self.include_usage = include_usage
        self.created = int(time.time())
        self.usage = UsageCounter([len(p) for p in prompt_ids])
        self.prompt_ids = prompt_ids
        self.token_bytes = token_bytes
        self.special_ids = special_ids
        self.echo_logprobs, self.prompt_logprobs = echo_logprobs, prompt_logprobs
        self._started: set[int] = set()
        self._offsets: dict[int, TextOffsets] = {}  # choice index -> its text's character offsets

    def _chunk(self, choices: list[CompletionChoice], **extra: object) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices, **extra)  # type: ignore[arg-type]

    def opening(self) -> list[BaseModel]:
        return []

    def _offsets_of(self, index: int, k: int) -> TextOffsets:
        """Scored echo: offsets count from the prompt's first token; else from after the echo."""
        if index not in self._offsets:
            start = 0 if self.echo is None or self.echo_logprobs is not None else len(self.echo[k])
            self._offsets[index] = TextOffsets(start, self.special_ids)
        return self._offsets[index]

    def _prompt_entries(self, k: int, index: int, scored: tuple[TokenLogprob | None, ...]) -> CompletionLogprobs:
        """The echoed prompt's logprobs (the first token has none), offsets from 0."""
        assert self.echo_logprobs is not None
        offsets, ids = self._offsets_of(index, k), self.prompt_ids[k]
        first = ids[0]
        b = self.token_bytes(first)
        out = CompletionLogprobs(tokens=[display_token(b)], token_logprobs=[None], top_logprobs=[None],
                                 text_offset=[offsets.add(first, b)])
        trimmed = [dataclasses.replace(t, top=t.top[: self.echo_logprobs]) for t in scored[1:] if t is not None]
        rest = completion_logprobs(trimmed, self.token_bytes, offsets)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(out, name).extend(getattr(rest, name))
        return out

    def on_delta(self, k: int, delta: Delta) -> list[BaseModel]:
        self.usage.add(k, len(delta.token_ids), delta.usage)
        index = k * self.n + delta.index
        text = delta.text
        if self.echo is not None and index not in self._started:
            text = self.echo[k] + text
        self._started.add(index)
        scored = delta.prompt_logprobs
        if not text and delta.finish_reason is None and not delta.logprobs and scored is None:
            return []
        logprobs = None
        if scored is not None and self.echo_logprobs is not None:
            logprobs = self._prompt_entries(k, index, scored)
        if delta.logprobs is not None:
            out = completion_logprobs(delta.logprobs, self.token_bytes, self._offsets_of(index, k))
            if logprobs is None:
                logprobs = out
            else:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, name).extend(getattr(out, name))
        vllm = None
        if scored is not None and self.prompt_logprobs is not None:
            vllm = vllm_prompt_logprobs(scored, self.prompt_logprobs, self.token_bytes)
        choice = CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
            prompt_logprobs=vllm,
        )
        return [self._chunk([choice])]

    def closing(self) -> list[BaseModel]:
        return [self._chunk([], usage=self.usage.total())] if self.include_usage else []


async def _collect(
    run: EngineRun, writer: CompletionChunkWriter, num_choices: int, want_logprobs: bool
) -> CompletionResponse:
    choices = [
        CompletionChoice(index=i, text="", logprobs=CompletionLogprobs() if want_logprobs else None)
        for i in range(num_choices)
    ]
    texts: list[list[str]] = [[] for _ in range(num_choices)]

    def on_delta(k: int, delta: Delta) -> None:
        for chunk in writer.on_delta(k, delta):
            assert isinstance(chunk, CompletionResponse)
            for part in chunk.choices:
                merged = choices[part.index]
                texts[part.index].append(part.text)
                if part.logprobs is not None and merged.logprobs is not None:
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(merged.logprobs, name).extend(getattr(part.logprobs, name))
                if part.finish_reason is not None:
                    merged.finish_reason, merged.stop_reason = part.finish_reason, part.stop_reason
                if part.prompt_logprobs is not None:
                    merged.prompt_logprobs = part.prompt_logprobs

    await consume(run, on_delta)
    for choice, parts in zip(choices, texts, strict=True):
        choice.text = "".join(parts)
    return CompletionResponse(
        id=writer.request_id, created=writer.created, model=writer.model, choices=choices, usage=writer.usage.total()
    )


async def create_completion(ctx: ServingContext, http: Request, ticket: Ticket) -> Response:
    """Under `ticket` (serving.py's `admitted`)."""
    body = await parse_body(ctx, http, CompletionRequest)
    check_sampling_limits(body)
    ctx.check_model(body.model)
    items = body.prompts()
    ticket.resize((body.n or 1) * len(items))  # before any prompt is tokenized
    prompts: list[PreparedPrompt] = []
    for k, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{k}]"
        if isinstance(item, str):
            ids = await ctx.text_prompt_ids(item, add_special_tokens=body.add_special_tokens is not False, param=param)
        else:
            ids = item
        prompts.append(ctx.prepare(ids, body.requested_max_tokens, prompt_param=param, max_tokens_param="max_tokens"))
        if not isinstance(item, str):  # after the length check, so at most max_model_len ids are scanned
            ctx.check_token_ids(item, param)
    spec = structured_spec(body)
    params = [body.to_sampling_params(max_tokens=p.max_tokens, structured=spec) for p in prompts]
    for p in params:
        ctx.check_params(p)
    echo = None
    if body.echo:
        echo = [item if isinstance(item, str) else ctx.tokenizer.decode(item) for item in items]
    request_id = f"cmpl-{request_id_of(http.scope)}"
    run = ctx.engine_run(request_id, prompts, params, body, http)
    n = params[0].n
    writer = CompletionChunkWriter(
        request_id, ctx.model_name, n, [p.token_ids for p in prompts], echo, body.include_usage,
        ctx.tokenizer.token_bytes, special_ids=frozenset(getattr(ctx.tokenizer, "all_special_ids", ())),
        echo_logprobs=body.logprobs if body.echo else None, prompt_logprobs=body.prompt_logprobs,
    )
    collect = partial(_collect, run, writer, n * len(prompts), body.logprobs is not None)
    return await respond(ctx, http, run, ticket, stream=bool(body.stream), writer=writer, collect=collect)
