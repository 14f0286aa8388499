"""Engine limits and pool sizes: what the scheduler may run per step and how much memory it owns."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mcserve.server.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
             f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Scheduler and pool settings, fixed for the life of an engine.

    max_num_seqs: running sequences (each holds one state slot) at most.
    max_num_batched_tokens: tokens per step (a decode row counts 1, a prefill chunk its length).
    max_model_len: positions 0..max_model_len-1 exist; a sequence that reaches it finishes ("length").
    max_waiting: bound of the waiting queue; `add_request` beyond it raises QueueFullError.
    segment_size: C, the model's MC segment size; prefill chunks end on multiples of it.
    num_state_slots: online-state slots; those beyond max_num_seqs hold end-of-turn snapshots.
    num_checkpoint_blocks / num_host_blocks: GPU checkpoint pool and host (offload) pool sizes.
    utility_decay: per-step decay of a checkpoint's SSC utility, in (0, 1] (1 = never forget).
    enable_prefix_caching: reuse checkpoints across requests through the prefix index.
    enable_snapshots: park a finished sequence's state slot for the next chat turn (needs prefix
        caching; ignored without it).
    evict_running_checkpoints: under pressure, offload or drop checkpoints that running sequences
        hold. Only sound for `ssc`, whose readout selects among the checkpoints present; aggregations
        that read every checkpoint (residual, grm, soup) must turn it off.
    reads_checkpoints: the model's outputs depend on the checkpoints it reads (every aggregation but
        `none`), so a step that reads around a hole is inexact and its results are not published.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    max_waiting: int = 1024
    segment_size: int = 256
    num_state_slots: int = 128
    num_checkpoint_blocks: int = 512
    num_host_blocks: int = 0
    utility_decay: float = 0.99
    enable_prefix_caching: bool = True
    enable_snapshots: bool = True
    evict_running_checkpoints: bool = True
    reads_checkpoints: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting",
                     "segment_size", "num_state_slots"):
            _positive_int(name, getattr(self, name))
        _positive_int("num_checkpoint_blocks", self.num_checkpoint_blocks, minimum=2)
        _positive_int("num_host_blocks", self.num_host_blocks, minimum=0)
        _require(self.num_state_slots >= self.max_num_seqs,
                 f"num_state_slots ({self.num_state_slots}) must be >= max_num_seqs ({self.max_num_seqs}):"
                 " every running sequence holds a slot")
        # Every running sequence may decode in the same step, and a lone prefill must be able to
        # finish at least one whole segment per step, so the step budget must cover both floors.
        _require(self.max_num_batched_tokens >= max(self.max_num_seqs, self.segment_size),
                 f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max(max_num_seqs"
                 f" {self.max_num_seqs}, segment_size {self.segment_size})")
        if not self.evict_running_checkpoints:
            # Without eviction of held checkpoints a lone sequence of max_model_len must fit.
            need = self.max_model_len // self.segment_size
            _require(self.num_checkpoint_blocks >= need,
                     f"num_checkpoint_blocks ({self.num_checkpoint_blocks}) cannot hold one sequence of"
                     f" max_model_len {self.max_model_len} at segment_size {self.segment_size}"
                     f" ({need} blocks) when evict_running_checkpoints is off")
        d = self.utility_decay
        _require(isinstance(d, (int, float)) and math.isfinite(d) and 0.0 < d <= 1.0,
                 f"utility_decay must be in (0, 1], got {d!r}")
        for name in ("enable_prefix_caching", "enable_snapshots", "evict_running_checkpoints", "reads_checkpoints"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def snapshots(self) -> bool:
        """End-of-turn snapshots are on (they resume through the prefix index)."""
        return self.enable_prefix_caching and self.enable_snapshots
