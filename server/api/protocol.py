"""Request and response bodies of the OpenAI-compatible API (pydantic), and their conversion to
`SamplingParams`.

Requests parse strictly (no "10" for 10, no true for 1, no NaN/inf) and ignore unknown fields, as
OpenAI-compatible servers do so that newer clients keep working. Checks that need more than one
field or the model live in `to_sampling_params` and raise `InvalidRequestError` naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError

MAX_PROMPTS = 64  # prompts in one /v1/completions request


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False


class ContentPart(_Request):
    """One part of a message's content. Only `type: "text"` is served; others are refused in chat.py."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    type: str
    text: str | None = None


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallIn(_Request):
    """A tool call of an earlier assistant turn, sent back in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments object; None = any object
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions: OpenAI's plus vLLM's extras plus `mc_top_k`."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None
    session_id: str | None = Field(default=None, max_length=256)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # vLLM's: no cache sharing across salts
    mc_top_k: int | None = None
    # vLLM's structured-output extras (server/api/structured.py maps them to one StructuredSpec)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = None  # vLLM extra: each prompt token's logprob and top alternatives

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.priority is not None and not -(2**63) <= self.priority < 2**63:
            raise InvalidRequestError(f"priority must be a 64-bit integer, got {self.priority}", param="priority")

    def _build(self, *, max_tokens: int | None, logprobs: int | None, renames: dict[str, str],
               structured: StructuredSpec | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = -1 if self.top_k in (None, 0) else self.top_k
        kwargs: dict[str, Any] = dict(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            mc_top_k=self.mc_top_k,
        )
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return SamplingParams(
                **kwargs,
                max_tokens=max_tokens,
                stop=stop,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                logprobs=logprobs,
                logit_bias=bias,
                structured=structured,
                prompt_logprobs=prompt_logprobs,
            )
        except InvalidRequestError as e:
            # SamplingParams names its own field; report the one the client sent.
            raise InvalidRequestError(e.message, param=renames.get(e.param or "", e.param)) from None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        """The client's cap on output tokens; None = the server's default_max_tokens (or the room left)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, *, max_tokens: int | None, structured: StructuredSpec | None = None) -> SamplingParams:
        """`max_tokens`: the cap after defaulting (the caller knows the prompt and context length);
        `structured`: the grammar server/api/structured.py made of the request."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._build(
            max_tokens=max_tokens,
            logprobs=logprobs,
            renames={"logprobs": "top_logprobs", "max_tokens": self.max_tokens_field},
            structured=structured,
            prompt_logprobs=self.prompt_logprobs,
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool | None = True

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        items: list[str | list[int]] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
        return items

    @property
    def requested_max_tokens(self) -> int | None:
        """16 when absent (OpenAI's default); an explicit null means up to the context limit."""
        return self.max_tokens

    def to_sampling_params(self, *, max_tokens: int | None, structured: StructuredSpec | None = None) -> SamplingParams:
        self._check_common()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequestError(
                f"best_of must equal n, got best_of={self.best_of} n={self.n or 1}", param="best_of"
            )
        # echo + logprobs scores the echoed prompt too: prompt logprobs with as many alternatives
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return self._build(max_tokens=max_tokens, logprobs=self.logprobs, renames={}, structured=structured,
                           prompt_logprobs=max(ks) if ks else None)


class TokenizeRequest(_Request):
    """Exactly one of `prompt` (text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class PromptLogprob(_Response):
    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's shape of prompt logprobs: per prompt token {token id: entry} (the token itself and the top
# alternatives); None for the first token, which nothing precedes
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class _Sparse(_Response):
    """Serialised without its None fields (stream deltas carry only what changed)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    """One piece of a streamed tool call: the first has id, type and name; later ones extend arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM extra: the stop string or token id that ended it


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    # vLLM extra, only when the request asks (one prompt for all choices)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatDelta(_Sparse):
    """Serialised without its unset fields: the closing delta of a choice is `{}`, as OpenAI sends it."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    # once, on the first chunk with a token, only when the request asks
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class CompletionLogprobs(_Response):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None: the echoed prompt's first token (nothing precedes it)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, when the request asks


class CompletionResponse(_Response):
    """Also the stream chunk of /v1/completions (same `object`, as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mcserve"
    root: str | None = None
    max_model_len: int | None = None
    notice: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str
