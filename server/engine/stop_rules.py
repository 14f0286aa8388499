"""When a choice stops: the stop conditions checked on each new token, and the text it adds.

In this order, the first that holds decides:
1. a `stop_token_ids` token: "stop", stop_reason = the id;
2. an eos token, unless `ignore_eos`: "stop";
3. a stop string completed by the text: "stop", stop_reason = the string. Stop strings count only
   once `min_tokens` output tokens exist (vLLM's rule): before that the text is emitted as it
   comes, and a stop string that starts there and ends later is not matched;
4. the token completes the request's grammar (structured output): "stop";
5. `max_tokens` output tokens: "length";
6. the scheduler ended the sequence at `max_model_len`: "length".
A stop or eos token stays in the token ids but adds no text. The sampler masks eos and stop tokens
while fewer than `min_tokens` tokens exist, so rules 1 and 2 cannot fire before then either.
"""

from __future__ import annotations

import sys
from collections.abc import Set

from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.text.detokenizer import IncrementalDetokenizer


class StopRules:
    """One choice's rules and its detokenizer, built once per choice: `check` runs for each of its
    tokens, so it allocates nothing and looks at the params only through what __init__ kept.
    `finish_reason` / `stop_reason`: None while the choice goes on; set by the `check` that stops it."""

    __slots__ = ("detok", "finish_reason", "stop_reason", "_stop_ids", "_eos", "_min_tokens", "_max_tokens")

    def __init__(self, params: SamplingParams, eos_token_ids: Set[int], detok: IncrementalDetokenizer) -> None:
        self.detok = detok
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._stop_ids = frozenset(params.stop_token_ids)
        self._eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self._min_tokens = params.min_tokens
        self._max_tokens = sys.maxsize if params.max_tokens is None else params.max_tokens

    def check(self, token: int, num_output_tokens: int, ended_by_scheduler: str | None = None,
              grammar_done: bool = False) -> str:
        """Apply the rules to the choice's newest `token` (already counted in `num_output_tokens`);
        returns the text it adds (with the detokenizer's held-back tail when the choice finishes for
        another reason than a stop string). The detokenizer gets the token unless rule 1 or 2 stops it.
        `ended_by_scheduler`: the finish reason the scheduler gave the sequence this step, if any;
        `grammar_done`: the token completed the sequence's grammar."""
        detok, reason = self.detok, None
        if token in self._stop_ids:
            reason, self.stop_reason, text = "stop", token, ""
        elif token in self._eos:
            reason, text = "stop", ""
        else:
            text = detok.push(token, num_output_tokens >= self._min_tokens)
            if detok.stopped:
                self.finish_reason, self.stop_reason = "stop", detok.stop_reason
                return text
            if grammar_done:
                reason = "stop"
            elif num_output_tokens >= self._max_tokens:
                reason = "length"
            elif ended_by_scheduler is None:
                return text  # goes on: the usual case
            else:
                reason = ended_by_scheduler
        self.finish_reason = reason
        return text + detok.flush()
