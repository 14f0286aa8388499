"""What the engine streams back for a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token, logprob), best first
    rank: int | None = None  # 1 = the most likely token; set for prompt logprobs


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the checkpoint cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Delta:
    """New output of one choice (`index` < n) since the last delta. Not frozen, but never changed
    after it is made: the engine makes one per running choice per step, and a frozen dataclass's
    __init__ (object.__setattr__ per field) costs ~4x as much.

    `finish_reason` is set on the choice's last delta: "stop" (eos, stop string or stop token),
    "length" (max_tokens or the context limit), "abort" or "error" (then `error` says why).
    `usage` is set on the last delta of the whole request (all choices finished).
    `prompt_logprobs` (when the params ask): on the choice's first delta with a token, one entry per
    prompt token, None for the first (nothing precedes it).
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
