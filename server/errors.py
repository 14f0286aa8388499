"""Errors that reach a user. Each carries what the HTTP layer needs for an OpenAI-style body.

Internal invariants use `assert`; everything a user or a config can get wrong raises one of these,
with the offending value in the message.
"""

from __future__ import annotations


class MCServeError(Exception):
    """Base of user-facing errors: `message`, OpenAI `type`, `param`, `code` and HTTP status."""

    http_status: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


class InvalidRequestError(MCServeError):
    """A request field is invalid (400)."""


class ContextLengthError(InvalidRequestError):
    """Prompt (+ max_tokens) exceeds the model's context limit (400)."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


def check_context_length(
    prompt_tokens: int,
    max_model_len: int,
    *,
    param: str = "prompt",
    max_tokens: int | None = None,
    max_tokens_param: str = "max_tokens",
    need_output: bool = True,
) -> None:
    """The one context-length rule: positions 0..max_model_len-1 hold the prompt and, when
    `need_output`, at least one generated token (`max_tokens` of them when given). Raises
    ContextLengthError naming the field to change."""
    limit = max_model_len - 1 if need_output else max_model_len
    if prompt_tokens > limit:
        why = " (at least one token must be left for the output)" if need_output else ""
        raise ContextLengthError(f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                                 f"has {prompt_tokens} tokens{why}; shorten the prompt", param=param)
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_tokens + max_tokens} "
            f"tokens were requested ({prompt_tokens} in the prompt + {max_tokens} in {max_tokens_param}); "
            f"shorten the prompt or lower {max_tokens_param}",
            param=max_tokens_param,
        )


class AuthenticationError(MCServeError):
    http_status = 401
    error_type = "authentication_error"


class NotFoundError(MCServeError):
    http_status = 404
    error_type = "not_found_error"


class QueueFullError(MCServeError):
    """The waiting queue is full: 503 with Retry-After."""

    http_status = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after_s = retry_after_s


class EngineDeadError(MCServeError):
    """The engine loop died; every request fails with 503 until restart."""

    http_status = 503
    error_type = "server_error"


class SessionFileError(MCServeError):
    """A saved session cannot be restored: its file is corrupt or truncated, or was saved by another
    model or with other MC settings (409). Nothing of it is loaded."""

    http_status = 409

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"the saved session file {file} cannot be restored: {problem}; DELETE the session to "
                         "discard it", param="session_id", code="session_file_invalid")
        self.file = file
        self.problem = problem


class ModelLoadError(ValueError):
    """A checkpoint directory cannot be served. The message names the file and the field."""

    def __init__(self, file: str, field: str | None, problem: str) -> None:
        where = f"{file}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.field = field
        self.problem = problem


class ConfigError(ValueError):
    """An engine/server setting is invalid or cannot be satisfied (e.g. memory budget)."""


def count_in_budget(budget: str, budget_bytes: int, unit: str, unit_bytes: int, minimum: int, why: str = "",
                    alternative: str = "") -> int:
    """How many units of `unit_bytes` fit in `budget_bytes`; ConfigError naming the budget when fewer
    than `minimum` (why: what asks for that minimum; alternative: another way out than a larger budget)."""
    if unit_bytes <= 0:
        raise ConfigError(f"bytes per {unit} must be positive, got {unit_bytes}")
    n = budget_bytes // unit_bytes
    if n < minimum:
        raise ConfigError(
            f"{budget} of {budget_bytes} bytes ({budget_bytes / 2**30:.2f} GiB) holds {n} {unit} of {unit_bytes}"
            f" bytes, fewer than the {minimum} required{why}: raise it to at least {minimum * unit_bytes} bytes"
            f"{alternative}")
    return n
