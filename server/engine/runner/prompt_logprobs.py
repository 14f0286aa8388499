"""Prompt logprobs of one prefill chunk: row j of its logits `[T, V]` (position start + j) scores the
prompt token at start + j + 1. Reduced on the device to each target's logprob, rank and the top k,
so only `[n, 2 + 2k]` numbers come back (never the `[T, V]` logits). Raw model logprobs: no
penalties, bias or grammar (those belong to sampling), floored like the sampler's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mcserve.server.engine.plan import PrefillChunk
from mcserve.server.engine.sampler import LOGPROB_FLOOR, SamplingRow

# (chosen logprob, rank, [(token_id, logprob)] best first), one per scored position
PromptLogprob = tuple[float, int, list[tuple[int, float]]]


def chunk_prompt_logprobs(logits: torch.Tensor, start: int, prompt: Sequence[int], k: int, vocab_size: int
                          ) -> tuple[int, list[PromptLogprob]]:
    """(position of the first scored prompt token, its entries and the following ones). `logits`:
    the chunk's `[T, V']` (V' >= vocab_size); `prompt`: the whole prompt's ids."""
    first = start + 1
    n = min(logits.shape[0], len(prompt) - first)  # rows whose next token is still in the prompt
    if n <= 0:
        return first, []
    x = logits[:n, :vocab_size].float()
    targets = torch.as_tensor(prompt[first : first + n], dtype=torch.long).to(x.device, non_blocking=True)
    lse = x.logsumexp(dim=-1, keepdim=True)  # [n, 1]
    chosen = x.gather(1, targets[:, None])
    rank = (x > chosen).sum(dim=-1, keepdim=True) + 1
    cols = [(chosen - lse).clamp_min_(LOGPROB_FLOOR).double(), rank.double()]
    k = min(k, vocab_size)
    if k > 0:
        top = x.topk(k, dim=-1)
        cols += [top.indices.double(), (top.values - lse).clamp_min_(LOGPROB_FLOOR).double()]
    host = torch.cat(cols, dim=1).tolist()  # one transfer; float64 holds ids exactly
    return first, [(r[0], int(r[1]), [(int(t), v) for t, v in zip(r[2 : 2 + k], r[2 + k :], strict=True)])
                   for r in host]


def scores_prompt(sampling: Mapping[int, SamplingRow], chunk: PrefillChunk) -> bool:
    """Whether this chunk's logits are all needed: its sequence asks for prompt logprobs and some of
    its positions score a prompt token."""
    row = sampling.get(chunk.seq_id)
    return (row is not None and row.params.prompt_logprobs is not None
            and chunk.start_pos + 1 < len(row.prompt_token_ids))
