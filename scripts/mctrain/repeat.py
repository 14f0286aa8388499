"""Repeated-span windows: a stretch of real text, then the same stretch again (issue 13).

Layout of one window (token positions):

    text prefix | span (L tokens) | gap text (g tokens) | the same span again | text

Every target is scored as language modelling. Past the first token of the second copy every next
token is in the context, L + g tokens back: a model that copies from its memory predicts it, one
that does not pays the text's usual loss. With L up to hundreds of tokens the span outgrows what one
recurrent state holds, so the checkpoints cached while the first copy went by are what can still
hold it. Meant to teach the chat model to copy from earlier in the context (a definition's headword
from the question) and to read its cache for it; two fine-tuning runs on it did not get there
(docs/MODEL.md, "Fine-tuning the shipped model on repeated spans").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RepeatSeq:
    ids: np.ndarray  # [W] int64
    copy_start: int  # position of the second copy's first token
    span: int  # L


@dataclass(frozen=True, slots=True)
class RepeatTask:
    min_span: int = 16
    max_span: int = 480
    max_gap: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_span <= self.max_span or self.max_gap < 0:
            raise ValueError(f"need 1 <= min_span <= max_span and max_gap >= 0, got {self.min_span}, "
                             f"{self.max_span}, {self.max_gap}")

    def make(self, text: np.ndarray, span: int, gap: int, start: int) -> RepeatSeq:
        """`text` with text[start:start+span] written again at start + span + gap."""
        W = len(text)
        if span < 1 or gap < 0 or start < 0 or start + 2 * span + gap > W:
            raise ValueError(f"a span of {span} at {start} twice with a gap of {gap} does not fit in {W} tokens")
        ids = np.asarray(text, dtype=np.int64).copy()
        c = start + span + gap
        ids[c:c + span] = ids[start:start + span]
        return RepeatSeq(ids, c, span)

    def sample(self, rng: np.random.Generator, text: np.ndarray) -> RepeatSeq:
        """A training window: span log-uniform in [min_span, max_span] (cut to what fits), gap uniform
        in [0, max_gap], placed uniformly in the window."""
        W = len(text)
        gap = int(rng.integers(0, min(self.max_gap, max(W - 2, 0)) + 1))
        hi = min(self.max_span, (W - gap) // 2)
        lo = min(self.min_span, hi)
        if hi < 1:
            raise ValueError(f"a {W}-token window holds no repeated span")
        span = int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))
        span = max(lo, min(span, hi))
        start = int(rng.integers(0, W - 2 * span - gap + 1))
        return self.make(text, span, gap, start)
