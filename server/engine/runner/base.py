"""The contract between the engine and whatever executes plans on the model.

The engine sees only `ModelRunner`: `execute(plan, sampling) -> RunnerOutput` once per step (or,
with async scheduling, `launch` then `collect`), and `take_selections()` when it publishes
metrics. A runner with `keeps_tables` keeps every running sequence's block table from the plans'
diffs (plan.py), so the scheduler leaves the decode rows' tables empty, and holds the router
weights back (`StepOutput.block_weights` empty): the scheduler's cache pulls them with
`take_block_weights` before it picks a victim, and the engine every `WEIGHTS_EVERY` steps.

Failures: a runner reports what it can attribute and raises what it cannot. A stage that fails for
some sequences (their slot restore, the prefill pass, the decode pass, their sampling) puts them in
`RunnerOutput.failed` and the other stages go on; the engine fails those sequences and frees what
they hold. A failed block copy raises `TransferError` (the pools may no longer hold what the
scheduler's bookkeeping says); any other exception fails the whole plan.

`factory.make_runner` picks the implementation once, at start-up; every implementation must produce
the tokens the torch reference runner (`torch_runner.py`) produces for the same plans, and must run
a plan's stages in plan.py's order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.engine.plan import PrefillChunk, StepOutput, StepPlan
from mcserve.server.engine.runner.prompt_logprobs import PromptLogprob, chunk_prompt_logprobs, scores_prompt
from mcserve.server.engine.sampler import SamplingRow
from mcserve.server.model.batched_prefill import PrefillInput

if TYPE_CHECKING:
    from mcserve.server.engine.sampler import Sampler
    from mcserve.server.engine.structured.masks import TokenMasks

# seq_id -> (the chosen token's logprob, [(token_id, logprob)] best first)
Logprobs = dict[int, tuple[float, list[tuple[int, float]]]]


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """What one step produced.

    step: sampled tokens and block weights for the scheduler (none for failed sequences).
    logprobs: only for rows whose params ask for logprobs.
    prompt_logprobs: seq_id -> (position of the first prompt token scored, one entry per position
        from there), for prefill chunks of sequences whose params ask for prompt logprobs.
    failed: seq_id -> the exception of the stage that failed it; its state slot and the blocks it
        wrote this step hold garbage.
    """

    step: StepOutput
    logprobs: Logprobs = field(default_factory=dict)
    prompt_logprobs: dict[int, tuple[int, list[PromptLogprob]]] = field(default_factory=dict)
    failed: dict[int, Exception] = field(default_factory=dict)


class TransferError(RuntimeError):
    """A block copy between the GPU and host pools failed: some blocks hold unknown content while the
    scheduler's bookkeeping says they hold checkpoints."""


class ModelRunner(ABC):
    """Owns the device memory of sequences (state slots, checkpoint pools) and executes plans on it.

    Who holds which slot or block is the scheduler's bookkeeping; the runner only follows the plan.
    `sampling` (seq_id -> SamplingRow) must cover every decode row and every prefill chunk that
    samples; a row's `params.mc_top_k` also sets SSC's k for that sequence's chunks.
    """

    spec: MCSpec

    @abstractmethod
    def execute(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> RunnerOutput:
        """Run every stage of `plan` and sample; returns once the sampled tokens are on the host."""

    keeps_tables = False
    overlaps = False  # `launch` returns before the step's results are on the host (async scheduling)

    def launch(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> object:
        """Start `plan`; `collect` gives its output. Launches are collected once each, in order, at most
        one step behind (a runner that `overlaps` keeps two steps' output buffers). A runner that does
        not overlap runs the whole step here."""
        return self.execute(plan, sampling)

    def collect(self, launched: object) -> RunnerOutput:
        """The output of a `launch` (waits for its device->host copy)."""
        assert isinstance(launched, RunnerOutput), type(launched)
        return launched

    @abstractmethod
    def take_selections(self) -> list[int]:
        """Checkpoint reads per layer chosen by the router since the last call, then reset to 0."""

    def take_block_weights(self, now: int) -> np.ndarray:
        """Router weight per GPU block held back since the last call, decayed to step `now`: [blocks]
        float64 (0 where none), empty when the runner holds nothing back; then forgotten."""
        return np.zeros(0, dtype=np.float64)

    def close(self) -> None:  # noqa: B027 -- most runners hold nothing outside the process
        """Release what outlives the object (the tensor-parallel workers); idempotent."""


def request_top_k(spec: MCSpec, sampling: Mapping[int, SamplingRow], seq_id: int) -> int | None:
    """SSC's k for one sequence: the request's `mc_top_k` can only lower the model's. A chunk that
    does not sample may have no row; it reads with the model's k (None)."""
    row = sampling.get(seq_id)
    k = None if row is None else row.params.mc_top_k
    return None if k is None else min(k, spec.top_k)


def sample_rows(sampler: Sampler, masks: TokenMasks | None, logits: list[torch.Tensor], row_ids: list[int],
                sampling: Mapping[int, SamplingRow]) -> tuple[dict[int, int], Logprobs]:
    """The host sampler over the rows' logits (one per row, in `row_ids` order), with the grammar
    masks when any: sampled ids, and logprobs for the rows that asked for them."""
    if not row_ids:
        return {}, {}
    rows = [sampling[s] for s in row_ids]
    allowed = masks.bitmask(row_ids) if masks is not None else None
    sampled = sampler(torch.cat(logits), rows, allowed)
    token_ids = dict(zip(row_ids, sampled.token_ids, strict=True))
    logprobs: Logprobs = {}
    if sampled.logprobs is not None:
        assert sampled.top_logprobs is not None
        for i, (seq_id, row) in enumerate(zip(row_ids, rows, strict=True)):
            if row.params.logprobs is not None:
                logprobs[seq_id] = (sampled.logprobs[i], sampled.top_logprobs[i])
    return token_ids, logprobs



def prefill_modes(sampling: Mapping[int, SamplingRow], chunks: list[PrefillChunk]) -> list[str]:
    """Which logits each chunk's pass returns: "all" when it scores prompt tokens, "last" when it
    only samples, "none" otherwise (`PrefillInput.logits`)."""
    return ["all" if scores_prompt(sampling, c) else "last" if c.sample else "none" for c in chunks]


def prefill_inputs(spec: MCSpec, sampling: Mapping[int, SamplingRow], chunks: list[PrefillChunk],
                   modes: list[str]) -> list[PrefillInput]:
    return [PrefillInput(c.token_ids, c.slot, c.start_pos, c.read_blocks, c.write_blocks,
                         request_top_k(spec, sampling, c.seq_id), mode)
            for c, mode in zip(chunks, modes, strict=True)]


def split_prefill_logits(chunks: list[PrefillChunk], logits: list[torch.Tensor | None], modes: list[str],
                         sampling: Mapping[int, SamplingRow], vocab_size: int,
                         prompt_lps: dict[int, tuple[int, list[PromptLogprob]]]) -> list[torch.Tensor]:
    """The sampling rows of a prefill pass's per-chunk logits (each sampling chunk's last row, in
    chunk order); the prompt logprobs of the chunks in mode "all" go into `prompt_lps`."""
    out = []
    for c, lg, mode in zip(chunks, logits, modes, strict=True):
        if mode == "all":
            assert lg is not None
            row = sampling[c.seq_id]
            prompt_lps[c.seq_id] = chunk_prompt_logprobs(lg, c.start_pos, row.prompt_token_ids,
                                                         row.params.prompt_logprobs, vocab_size)
            lg = lg[-1:]
        if c.sample:
            assert lg is not None
            out.append(lg)
    return out
