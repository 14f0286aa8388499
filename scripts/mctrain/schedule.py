"""Learning-rate schedule (linear warm-up, cosine decay to a floor) and the wall-clock step planner."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CosineSchedule:
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not self.peak_lr > 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, "
                             f"got {self.warmup_steps}, {self.total_steps}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.peak_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def plan_total_steps(steps_done: int, elapsed_s: float, step_time_s: float, budget_s: float,
                     reserve_frac: float = 0.08, min_steps: int = 1) -> int:
    """Total steps that fit in `budget_s` of wall clock, given the time per step measured so far and
    a reserve (evaluations, checkpoint writes) of `reserve_frac` of what is left."""
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    left = max(0.0, budget_s - elapsed_s) * (1 - reserve_frac)
    return max(min_steps, steps_done + int(left / step_time_s))
