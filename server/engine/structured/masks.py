"""`TokenMasks`: each guided sequence's grammar state, and the one bitmask per step that the sampler
applies to the whole batch.

Bitmask layout (llguidance's and xgrammar's): int32 `[B, ceil(V/32)]`, bit `t % 32` of word `t // 32`
set = token `t` allowed. Rows of sequences without a grammar are all ones. `V` is the grammar
tokenizer's vocabulary; logits columns past it (a padded lm_head) are cut by the sampler first.

Per step (the engine drives it):
1. `launch()` after scheduling: the masks of every sequence whose grammar moved since its last mask
   are computed on a worker thread (llguidance's `LLExecutor` fills them in parallel, without the
   GIL), while the engine thread runs the model forward;
2. `bitmask(seq_ids)` just before sampling waits for that work and gathers the batch's rows;
3. `accept([(seq_id, token), ...])` after sampling advances the grammars by their tokens (one
   parallel llguidance call for the batch).
A sequence added between steps gets its first mask in the next `launch()`, so its first token (the
one sampled at the end of its prefill) is masked too.

Each guided sequence owns one row of a pooled mask tensor while it lives; a row freed while the
worker may still write it is recycled only at the next `launch()`, after the worker has finished.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance as llg
import torch

from mcserve.server.engine.structured.compiler import GrammarCompiler
from mcserve.server.engine.structured.grammars import GrammarError, GrammarStatus
from mcserve.server.engine.structured.spec import StructuredSpec

_ALL = -1  # int32 with every bit set: no token masked


@dataclass(slots=True)
class _State:
    matcher: llg.LLMatcher
    row: int = 0  # 0 = no row yet (row 0 of the pool is the shared all-ones row)
    dirty: bool = True  # the grammar moved since `row` was filled


class TokenMasks:
    def __init__(self, compiler: GrammarCompiler, num_threads: int | None = None) -> None:
        self.compiler = compiler
        self.width = (compiler.vocab_size + 31) // 32
        self._pool = torch.full((16, self.width), _ALL, dtype=torch.int32)
        self._free = list(range(self._pool.shape[0] - 1, 0, -1))
        self._released: list[int] = []
        self._states: dict[int, _State] = {}
        # Leave a core for the model; the mask work per step is small and splits by sequence.
        threads = num_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._executor = llg.LLExecutor(threads)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="mcserve-masks")
        self._pending: Future[None] | None = None
        self.wait_s = 0.0  # time the engine thread spent blocked on the worker (what overlap did not hide)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def add(self, seq_id: int, spec: StructuredSpec) -> None:
        assert seq_id not in self._states, seq_id
        self._states[seq_id] = _State(self.compiler.matcher(spec))

    def remove(self, seq_id: int) -> None:
        st = self._states.pop(seq_id, None)
        if st is not None and st.row:
            self._released.append(st.row)

    def launch(self) -> None:
        """Start computing the masks of every sequence whose grammar moved (no-op if none did)."""
        self._wait()
        self._free.extend(self._released)
        self._released.clear()
        todo: list[tuple[llg.LLMatcher, int]] = []
        for st in self._states.values():
            if st.dirty:
                if not st.row:
                    st.row = self._take_row()
                st.dirty = False
                todo.append((st.matcher, st.row))
        if todo:
            pool = self._pool
            self._pending = self._worker.submit(
                self._executor.unsafe_compute_mask_ptr, todo, pool.data_ptr(), self.width * 4, pool.shape[0])

    def bitmask(self, seq_ids: list[int]) -> torch.Tensor | None:
        """`[len(seq_ids), width]` int32 for one step's sampled rows, in that order; None when none
        of them has a grammar (the sampler then skips the mask)."""
        if not self._states:  # no guided sequence: nothing per row
            return None
        rows = [self._states[s].row if s in self._states else 0 for s in seq_ids]
        if not any(rows):
            return None
        self._wait()
        assert not any(self._states[s].dirty for s in seq_ids if s in self._states), "mask not launched"
        return torch.from_numpy(self._pool.numpy()[rows])  # a copy: the pool is refilled next step

    def accept(self, sampled: list[tuple[int, int]]) -> dict[int, GrammarStatus | GrammarError]:
        """Advance the grammars of this step's (seq_id, token) pairs, in one parallel call: per
        guided sequence "done" when its grammar is complete (nothing but eos could follow), "open"
        otherwise, a GrammarError (returned, not raised) when the grammar cannot take the token.
        Sequences without a grammar are left out."""
        todo = [(seq_id, self._states[seq_id], tok) for seq_id, tok in sampled if seq_id in self._states]
        if not todo:
            return {}
        self._wait()  # the worker may be reading these matchers
        ok = self._executor.consume_token_par([(st.matcher, tok) for _, st, tok in todo])
        out: dict[int, GrammarStatus | GrammarError] = {}
        for (seq_id, st, tok), good in zip(todo, ok, strict=True):
            st.dirty = True
            m = st.matcher
            if not good:
                out[seq_id] = GrammarError(m.get_error() or f"token {tok} is not allowed by the grammar")
            else:
                out[seq_id] = "done" if m.is_stopped() else "open"
        return out

    def close(self) -> None:
        self._wait()
        self._worker.shutdown(wait=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not pending.done():
                start = time.perf_counter()
                pending.result()
                self.wait_s += time.perf_counter() - start
            pending.result()

    def _take_row(self) -> int:
        if not self._free:
            old = self._pool
            self._pool = torch.full((2 * old.shape[0], self.width), _ALL, dtype=torch.int32)
            self._pool[: old.shape[0]] = old
            self._free = list(range(self._pool.shape[0] - 1, old.shape[0] - 1, -1))
        return self._free.pop()
