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

from collections.abc import Set
from dataclasses import dataclass

from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.text.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class StopCheck:
    """finish_reason: None while the choice goes on, else "stop" or "length". text: what the token adds
    (with the detokenizer's held-back tail when the choice finishes for another reason than a stop
    string)."""

    finish_reason: str | None
    stop_reason: str | int | None
    text: str


def check_stop(token: int, num_output_tokens: int, params: SamplingParams, eos_token_ids: Set[int],
               detok: IncrementalDetokenizer, ended_by_scheduler: str | None = None, *,
               grammar_done: bool = False) -> StopCheck:
    """Apply the rules to the choice's newest `token` (already counted in `num_output_tokens`);
    `detok` is the choice's detokenizer, which this pushes the token to unless rule 1 or 2 stops it.
    `ended_by_scheduler`: the finish reason the scheduler gave the sequence this step, if any;
    `grammar_done`: the token completed the sequence's grammar."""
    reason, stop_reason, text = None, None, ""
    if token in params.stop_token_ids:
        reason, stop_reason = "stop", token
    elif token in eos_token_ids and not params.ignore_eos:
        reason = "stop"
    else:
        text = detok.push(token, check_stop=num_output_tokens >= params.min_tokens)
        if detok.stopped:
            reason, stop_reason = "stop", detok.stop_reason
    if reason is None and grammar_done:
        reason = "stop"
    if reason is None and params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        reason = "length"
    if reason is None:
        reason = ended_by_scheduler
    if reason is not None and not detok.stopped:
        text += detok.flush()
    return StopCheck(reason, stop_reason, text)
