"""One step's host->device diffs packed into one pinned buffer and sent in one copy.

Components of a runner (the persistent batch, the sampler's rows) `put` what changed this step as
4- or 8-byte values and register an applier with `then`; `send` copies the packed words to the
device in one non-blocking transfer from pinned memory and runs the appliers in order, each of which
reads its pieces (device views of the buffer) and scatters them into its persistent tensors.

On CPU the host buffer is the device buffer (no copy). Two host buffers alternate, each reused only
after its previous copy has finished (an event), so a step never overwrites words still in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_WORD = np.dtype(np.int32)
_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32,
           np.dtype(np.int64): torch.int64, np.dtype(np.float64): torch.float64}


@dataclass(frozen=True, slots=True)
class Piece:
    """Values put in this step: `get()` (after `send`) is their device view, shape as put."""

    staging: Staging
    offset: int  # in 4-byte words
    shape: tuple[int, ...]
    dtype: torch.dtype

    def get(self) -> torch.Tensor:
        assert self.staging.sent, "a piece is on the device only after send()"
        words = math.prod(self.shape) * (self.dtype.itemsize // 4)
        return self.staging.device_words[self.offset:self.offset + words].view(self.dtype).view(self.shape)


class Staging:
    def __init__(self, device: torch.device, words: int = 1 << 14) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._hosts = [self._host_buffer(words) for _ in range(2 if self._cuda else 1)]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._hosts)
        self._which = 0
        self._device = torch.empty(words, dtype=torch.int32, device=device) if self._cuda else self._hosts[0]
        self._n = 0
        self._appliers: list[Callable[[], None]] = []
        self.sent = False
        self.device_words = self._device
        self.num_sends = 0  # copies made (tests and benchmarks count them)

    def _host_buffer(self, words: int) -> torch.Tensor:
        return torch.empty(words, dtype=torch.int32, pin_memory=self._cuda)

    @property
    def empty(self) -> bool:
        return self._n == 0 and not self._appliers

    def put(self, values: np.ndarray | list, dtype: np.dtype | type | None = None) -> Piece:
        """Pack `values` (any shape) as `dtype`: int32, float32, int64 or float64 (default: an
        array's own dtype, int32 for lists)."""
        if self.sent:
            self._reset()
        if dtype is None:
            dtype = values.dtype if isinstance(values, np.ndarray) else np.int32
        arr = np.ascontiguousarray(values, dtype=dtype)
        assert arr.dtype in _DTYPES, arr.dtype
        width = arr.dtype.itemsize // 4
        if width == 2 and self._n % 2:
            self._n += 1  # 8-byte values start at an 8-byte boundary, so the device view is aligned
        words = arr.size * width
        self._reserve(self._n + words)
        host = self._hosts[self._which].numpy()
        host[self._n:self._n + words] = arr.reshape(-1).view(_WORD)
        piece = Piece(self, self._n, arr.shape, _DTYPES[arr.dtype])
        self._n += words
        return piece

    def then(self, apply: Callable[[], None]) -> None:
        """Run `apply` right after the copy (in registration order)."""
        if self.sent:
            self._reset()
        self._appliers.append(apply)

    def send(self) -> None:
        """The one host->device copy of the step, then the appliers. A no-op when nothing was put."""
        if self.sent or self.empty:
            return
        host = self._hosts[self._which]
        if self._cuda and self._n:
            self._device[:self._n].copy_(host[:self._n], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[self._which] = event
            self.num_sends += 1
        self.device_words = self._device if self._cuda else host
        self.sent = True
        for apply in self._appliers:
            apply()

    def _reset(self) -> None:
        self._n = 0
        self._appliers = []
        self.sent = False
        if self._cuda:
            self._which ^= 1
            event = self._events[self._which]
            if event is not None:
                event.synchronize()  # its copy ran two steps ago: done in practice

    def _reserve(self, words: int) -> None:
        cap = self._hosts[self._which].numel()
        if words <= cap:
            return
        new = 1 << (words - 1).bit_length()
        old = self._hosts[self._which]
        grown = self._host_buffer(new)
        grown[:self._n] = old[:self._n]
        self._hosts[self._which] = grown
        if self._cuda:
            if self._device.numel() < new:
                self._device = torch.empty(new, dtype=torch.int32, device=self.device)
        else:
            self._device = grown
