"""Training batches: random text windows, fractions of them turned into associative-recall sequences,
chat windows and repeated-span windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mctrain.chat_data import ChatData
from mctrain.recall import RecallTask
from mctrain.repeat import RepeatTask
from mctrain.token_data import TokenData


@dataclass(frozen=True, slots=True)
class Batch:
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    lm_mask: torch.Tensor  # [B, T] float: 1 where the target is scored as language modelling
    recall_mask: torch.Tensor  # [B, T] float: 1 where the target is a recall answer
    # the rows that are chat windows (scored on assistant tokens only)
    chat_rows: slice = field(default_factory=lambda: slice(0, 0))

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

        return Batch(*(move(t) for t in (self.inputs, self.targets, self.lm_mask, self.recall_mask)),
                     chat_rows=self.chat_rows)


@dataclass
class BatchSampler:
    """Rows [0, round(batch * recall_frac)) of every batch are recall sequences, scored on their answers
    only; the next round(batch * chat_frac) rows are chat windows, scored on the assistant's tokens;
    the next round(batch * repeat_frac) rows are text windows with a span written twice
    (mctrain.repeat), scored on every token; the other rows are plain text, scored on every token.
    Deterministic for a seed; with repeat_frac 0 the batches are those of a sampler without it."""

    data: TokenData
    task: RecallTask
    batch_size: int
    seq_len: int
    recall_frac: float
    max_pairs: int
    seed: int
    chat: ChatData | None = None
    chat_frac: float = 0.0
    repeat_frac: float = 0.0
    repeat: RepeatTask = field(default_factory=RepeatTask)

    def __post_init__(self) -> None:
        fracs = (self.recall_frac, self.chat_frac, self.repeat_frac)
        if not all(0 <= f <= 1 for f in fracs) or sum(fracs) > 1:
            raise ValueError(f"recall_frac, chat_frac and repeat_frac must be in [0, 1] with a sum <= 1, got "
                             f"{self.recall_frac}, {self.chat_frac}, {self.repeat_frac}")
        if self.chat_frac > 0 and self.chat is None:
            raise ValueError(f"chat_frac {self.chat_frac} needs chat data")
        self.rng = np.random.default_rng(self.seed)

    @property
    def recall_rows(self) -> int:
        return round(self.batch_size * self.recall_frac)

    @property
    def chat_rows(self) -> slice:
        return slice(self.recall_rows, self.recall_rows + round(self.batch_size * self.chat_frac))

    @property
    def repeat_rows(self) -> slice:
        start = self.chat_rows.stop
        return slice(start, min(self.batch_size, start + round(self.batch_size * self.repeat_frac)))

    def next(self) -> Batch:
        B, T = self.batch_size, self.seq_len
        ids = self.data.sample_windows(self.rng, B, T + 1)  # [B, T+1]
        recall = np.zeros((B, T), dtype=np.float32)
        for r in range(self.recall_rows):
            seq = self.task.sample_train(self.rng, ids[r], self.max_pairs)
            ids[r] = seq.ids
            recall[r, seq.query_pos] = 1.0
        lm = np.zeros((B, T), dtype=np.float32)
        lm[self.recall_rows:] = 1.0
        chat = self.chat_rows
        if chat.stop > chat.start:
            ids[chat], mask = self.chat.sample_windows(self.rng, chat.stop - chat.start, T + 1)
            lm[chat] = mask[:, 1:]  # a target is scored where the token it asks for is
        for r in range(self.repeat_rows.start, self.repeat_rows.stop):
            ids[r] = self.repeat.sample(self.rng, ids[r]).ids
        ids_t = torch.from_numpy(ids)
        return Batch(ids_t[:, :-1].contiguous(), ids_t[:, 1:].contiguous(), torch.from_numpy(lm),
                     torch.from_numpy(recall), chat_rows=chat)
