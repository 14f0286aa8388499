"""Per-request sampling parameters (validated at construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mcserve.kernels.mc_spec import mc_problem
from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError

_MAX_LOGPROBS = 20


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to generate and how. `temperature == 0` means greedy.

    `logprobs`: None = none; k >= 0 = the sampled token's logprob plus the top k alternatives.
    `seed`: makes this request's samples reproducible whatever else shares its batch.
    `mc_top_k`: lowers SSC's top_k for this request (None = the model's).
    `structured`: a grammar the output must follow (structured/spec.py); the engine compiles it.
    `prompt_logprobs`: None = none; k >= 0 = each prompt token's logprob (of the raw model, given the
    tokens before it) plus the top k alternatives. The prompt is then computed from position 0 (no
    cached prefix), since every position's logits are needed.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    mc_top_k: int | None = None
    structured: StructuredSpec | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and 1 <= self.n <= 64, "n", f"n must be in [1, 64], got {self.n!r}")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
               f"temperature must be in [0, 100], got {self.temperature!r}")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p",
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_finite(v) and -2.0 <= v <= 2.0, name, f"{name} must be in [-2, 2], got {v!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64), "seed",
               f"seed must be a 64-bit integer, got {self.seed!r}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", f"max_tokens must be >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(len(self.stop) <= 16 and all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop),
               "stop", "stop must be at most 16 non-empty strings of at most 256 characters")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= _MAX_LOGPROBS),
               "logprobs", f"top_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= _MAX_LOGPROBS),
               "prompt_logprobs", f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        _check(all(isinstance(t, int) and t >= 0 and _finite(b) and -100.0 <= b <= 100.0
                   for t, b in self.logit_bias.items()), "logit_bias",
               "logit_bias maps token ids to values in [-100, 100]")
        top_k_problem = None if self.mc_top_k is None else mc_problem("top_k", self.mc_top_k)
        _check(top_k_problem is None, "mc_top_k", f"mc_top_k {top_k_problem}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        for t in list(self.logit_bias) + list(self.stop_token_ids):
            _check(t < vocab_size, "logit_bias" if t in self.logit_bias else "stop_token_ids",
                   f"token id {t} is out of range for vocab size {vocab_size}")
