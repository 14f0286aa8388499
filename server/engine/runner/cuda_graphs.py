"""CUDA graphs of the decode step, one per (batch bucket, table-width bucket), captured at start-up.

Buckets: batch sizes 1, 2, 4, 8, 16, then multiples of 16 up to max_num_seqs (and max_num_seqs);
table widths the powers of two up to what max_model_len / segment_size needs. A step of B rows whose
tables need W entries replays the graph of the smallest buckets >= (B, W); the rows past B gather the
padding row (slot -1: read and written by no path). Beyond the largest batch bucket (a narrower
`cuda_graph_sizes` list) the step runs eagerly.

`forward(rows, width)` must be static-shape and sync-free and read its inputs from persistent
tensors only (the runner's persistent batch): a replay re-runs exactly the captured kernels on
whatever those tensors hold. Captured largest first, sharing one memory pool, so that each smaller
graph reuses the larger ones' activation memory. Capture runs with every order entry on the padding
row, so it changes no state.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

Forward = Callable[[int, int], torch.Tensor]


def batch_buckets(max_num_seqs: int, sizes: Sequence[int] | None = None) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to max_num_seqs (which is always one), or `sizes` capped by it."""
    if sizes is not None:
        return sorted({min(int(s), max_num_seqs) for s in sizes if int(s) >= 1})
    out = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted({*out, max_num_seqs})


def width_buckets(max_entries: int) -> list[int]:
    """Powers of two from 1 up to the first that holds `max_entries` table entries."""
    out = [1]
    while out[-1] < max_entries:
        out.append(out[-1] * 2)
    return out


def bucket(sizes: list[int], n: int) -> int | None:
    """The smallest size >= n, or None when n is past the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    def __init__(self, forward: Forward, batch_sizes: list[int], widths: list[int], enabled: bool,
                 pad_eager: bool = False) -> None:
        """pad_eager: eager steps also run at their bucket's batch size (what a replay computes; tests)."""
        self.forward = forward
        self.pad_eager = pad_eager
        self.batch_sizes, self.widths = batch_sizes, widths
        self.enabled = enabled
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        self.eager = 0
        self.capture_error: str | None = None

    def capture(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Capture every (batch, width) pair; returns the seconds it took. Logs a progress line. A
        capture that fails is logged with its traceback and leaves the engine eager (slower, same
        tokens), with the error in `capture_error`."""
        if not self.enabled:
            return 0.0
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                self._capture_all(progress)
        except Exception as e:  # noqa: BLE001 - degrade to eager, loudly
            log.exception("CUDA graph capture failed; the decode step runs eagerly")
            self.capture_error = f"{type(e).__name__}: {e}"
            self._graphs.clear()
            self.enabled = False
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.enabled:
            log.info("captured %d CUDA graphs in %.1f s", len(self._graphs), seconds)
        return seconds

    def _capture_all(self, progress: Callable[[int, int], None] | None) -> None:
        pool = torch.cuda.graph_pool_handle()
        pairs = [(b, w) for b in reversed(self.batch_sizes) for w in reversed(self.widths)]
        log.info("capturing %d CUDA graphs of the decode step (batch %s, table width %s)", len(pairs),
                 self.batch_sizes, self.widths)
        side = torch.cuda.Stream()
        for i, (b, w) in enumerate(pairs):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles, workspaces are allocated
                self.forward(b, w)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(b, w)
            self._graphs[(b, w)] = (graph, out)
            if progress is not None:
                progress(i + 1, len(pairs))
            elif (i + 1) % max(1, len(pairs) // 8) == 0 or i + 1 == len(pairs):
                log.info("CUDA graphs: %d/%d captured (last: batch %d, width %d)", i + 1, len(pairs), b, w)
        torch.cuda.synchronize()

    def run(self, rows: int, width: int) -> torch.Tensor:
        """Logits [>= rows, V] of the step (only the first `rows` are real)."""
        b, w = bucket(self.batch_sizes, rows), bucket(self.widths, width)
        entry = self._graphs.get((b, w)) if b is not None and w is not None else None
        if entry is None:
            self.eager += 1
            padded = b if self.pad_eager and b is not None else rows
            return self.forward(padded, w if w is not None else width)
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
