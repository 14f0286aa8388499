"""Every live row's sampling parameters, kept on the device between steps (the device sampler reads
them by row id): set once when a sequence gets a row, never resent while it lives.

Per row `[capacity]`: inverse temperature, greedy flag, top_k / top_p / log min_p (off = V / inf /
-inf), repetition / frequency / presence penalties, min_tokens, the number of tokens generated so
far (`n_out`, advanced on the device by every sample), the 64-bit RNG key (`counter_rng.py`), the
number of top logprobs asked (-1 = none). Sparse per row, `[capacity, width]` padded with V (a
column one past the vocabulary that the sampler drops): logit-bias ids and values, the token ids
that min_tokens bans. Dense `[capacity, V]`, allocated when the first row with a penalty arrives:
output token counts (advanced by a scatter per sampled token) and whether a token is in the prompt.

The host keeps only what decides which sampler stages run (how many live rows use each feature,
their largest top_k and logprobs) and updates it per added or cleared row: O(changes) per step.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcserve.server.engine.runner.counter_rng import split_key
from mcserve.server.engine.runner.staging import Staging
from mcserve.server.engine.sampler import GREEDY_TEMPERATURE, SamplingRow, seeded_key


@dataclass(frozen=True, slots=True)
class _Features:
    """What one live row contributes to the host-side stage decisions."""

    sampled: bool
    top_k: int  # V = off
    top_p: bool
    min_p: bool
    rep: bool
    additive: bool  # presence or frequency penalty
    bias: bool
    min_tokens: bool
    lp_k: int  # -1 = no logprobs


class SamplerRows:
    def __init__(self, capacity: int, vocab_size: int, device: torch.device, seed: int | None = None) -> None:
        self.capacity, self.vocab_size, self.device = capacity, vocab_size, device
        V = vocab_size

        def full(fill: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((capacity,), fill, dtype=dtype, device=device)

        self.inv_temp = full(1.0, torch.float32)
        self.greedy = full(True, torch.bool)
        self.top_k = full(V, torch.int64)
        self.top_p = full(math.inf, torch.float32)
        self.log_min_p = full(-math.inf, torch.float32)
        self.rep = full(1.0, torch.float32)
        self.freq = full(0.0, torch.float64)  # float64: the additive terms are summed as the CPU sampler sums them
        self.pres = full(0.0, torch.float64)
        self.min_tokens = full(0, torch.int64)
        self.n_out = full(0, torch.int64)
        self.key_hi = full(0, torch.int64)
        self.key_lo = full(0, torch.int64)
        self.lp_k = full(-1, torch.int64)
        self.bias_ids = torch.full((capacity, 0), V, dtype=torch.int64, device=device)
        self.bias_vals = torch.zeros((capacity, 0), dtype=torch.float64, device=device)
        self.ban_ids = torch.full((capacity, 0), V, dtype=torch.int64, device=device)
        self.counts: torch.Tensor | None = None  # [capacity, V] int32 output-token counts
        self.in_prompt: torch.Tensor | None = None  # [capacity, V] bool
        self._rng = random.Random(seed)  # keys of unseeded rows
        self._rows: dict[int, _Features] = {}
        self.uses: Counter[str] = Counter()  # feature -> live rows using it
        self._top_ks: Counter[int] = Counter()  # top_k of live sampled rows that truncate
        self._lp_ks: Counter[int] = Counter()

    @property
    def max_top_k(self) -> int:
        """The largest top_k < V of a live row (0: none truncates by top_k)."""
        return max(self._top_ks, default=0)

    @property
    def max_logprobs(self) -> int:
        """The most top logprobs a live row asks for (-1: no row asks for logprobs)."""
        return max(self._lp_ks, default=-1)

    def __contains__(self, row: int) -> bool:
        return row in self._rows

    def logprobs_asked(self, rows: Sequence[int]) -> list[int]:
        """Per row, how many top logprobs it asks for (-1 = none)."""
        return [self._rows[r].lp_k for r in rows]

    def set(self, rows: Sequence[int], params: Sequence[SamplingRow], staging: Staging) -> None:
        """Give `rows` the parameters of `params` (sequences that just got a row), through `staging`."""
        if not rows:
            return
        V = self.vocab_size
        f32, f64, i64 = [], [], []
        bias, ban, toks_out, toks_prompt = [], [], [], []
        need_counts = False
        for row, r in zip(rows, params, strict=True):
            assert row not in self._rows and 0 <= row < self.capacity, row
            sp = r.params
            greedy = sp.temperature < GREEDY_TEMPERATURE
            top_k = V if greedy or sp.top_k == -1 else min(sp.top_k, V)
            top_p = math.inf if greedy or sp.top_p >= 1.0 else sp.top_p
            log_min_p = -math.inf if greedy or sp.min_p <= 0.0 else math.log(sp.min_p)
            key = seeded_key(sp.seed, r.choice_index) if sp.seed is not None else self._rng.getrandbits(64)
            hi, lo = split_key(key)
            n_out = len(r.output_token_ids)
            lp_k = -1 if sp.logprobs is None else sp.logprobs
            f32.append((1.0 if greedy else 1.0 / sp.temperature, top_p, log_min_p, sp.repetition_penalty))
            f64.append((sp.frequency_penalty, sp.presence_penalty))
            i64.append((row, greedy, top_k, sp.min_tokens, n_out, hi, lo, lp_k))
            for t, b in sp.logit_bias.items():
                assert 0 <= t < V, f"token id {t} out of range for vocab {V}"
                bias.append((row, t, b))
            if sp.min_tokens > n_out:
                banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(r.eos_token_ids))
                ban.extend((row, t) for t in sorted(banned) if t < V)
            rep, additive = sp.repetition_penalty != 1.0, bool(sp.presence_penalty or sp.frequency_penalty)
            need_counts |= rep or additive
            if rep or additive:
                toks_out.extend((row, t) for t in r.output_token_ids)
            if rep:
                toks_prompt.extend((row, t) for t in r.prompt_token_ids)
            feat = _Features(not greedy, top_k, top_p != math.inf, log_min_p != -math.inf, rep, additive,
                             bool(sp.logit_bias), sp.min_tokens > n_out, lp_k)
            self._add(row, feat)
        pieces = [staging.put(f32, np.float32), staging.put(f64, np.float64), staging.put(i64, np.int64)]
        sparse = [staging.put(x, np.int64) if x else None for x in (ban, toks_out, toks_prompt)]
        bias_piece = None
        if bias:
            bias_piece = (staging.put([(r, t) for r, t, _ in bias], np.int64),
                          staging.put([b for _, _, b in bias], np.float64))
        width_bias = max(Counter(r for r, _, _ in bias).values(), default=0)
        width_ban = max(Counter(r for r, _ in ban).values(), default=0)
        staging.then(lambda: self._apply(pieces, bias_piece, *sparse, width_bias, width_ban, need_counts))

    def _apply(self, pieces, bias_piece, ban, toks_out, toks_prompt, width_bias: int, width_ban: int,
               need_counts: bool) -> None:
        f32, f64, i64 = (p.get() for p in pieces)
        rows = i64[:, 0]
        self.inv_temp[rows], self.top_p[rows] = f32[:, 0], f32[:, 1]
        self.log_min_p[rows], self.rep[rows] = f32[:, 2], f32[:, 3]
        self.freq[rows], self.pres[rows] = f64[:, 0], f64[:, 1]
        self.greedy[rows] = i64[:, 1].bool()
        self.top_k[rows], self.min_tokens[rows], self.n_out[rows] = i64[:, 2], i64[:, 3], i64[:, 4]
        self.key_hi[rows], self.key_lo[rows], self.lp_k[rows] = i64[:, 5], i64[:, 6], i64[:, 7]
        V = self.vocab_size
        if width_bias > self.bias_ids.shape[1]:
            self.bias_ids = _widen(self.bias_ids, width_bias, V)
            self.bias_vals = _widen(self.bias_vals, width_bias, 0.0)
        if width_ban > self.ban_ids.shape[1]:
            self.ban_ids = _widen(self.ban_ids, width_ban, V)
        for t in (self.bias_ids, self.ban_ids):
            t[rows] = V
        self.bias_vals[rows] = 0.0
        if bias_piece is not None:
            ids, vals = bias_piece[0].get(), bias_piece[1].get()
            col = _rank_within(ids[:, 0])
            self.bias_ids[ids[:, 0], col] = ids[:, 1]
            self.bias_vals[ids[:, 0], col] = vals
        if ban is not None:
            b = ban.get()
            self.ban_ids[b[:, 0], _rank_within(b[:, 0])] = b[:, 1]
        if need_counts and self.counts is None:
            self.counts = torch.zeros(self.capacity, V, dtype=torch.int32, device=self.device)
            self.in_prompt = torch.zeros(self.capacity, V, dtype=torch.bool, device=self.device)
        if self.counts is not None:
            assert self.in_prompt is not None
            self.counts[rows] = 0
            self.in_prompt[rows] = False
            if toks_out is not None:
                t = toks_out.get()
                self.counts.index_put_((t[:, 0], t[:, 1]), torch.ones_like(t[:, 0], dtype=torch.int32),
                                       accumulate=True)
            if toks_prompt is not None:
                t = toks_prompt.get()
                self.in_prompt[t[:, 0], t[:, 1]] = True

    def clear(self, rows: Sequence[int]) -> None:
        """Rows whose sequences left: their features no longer count (their tensors are rewritten by
        the next `set` of the row)."""
        for row in rows:
            feat = self._rows.pop(row)
            for name in ("sampled", "top_p", "min_p", "rep", "additive", "bias", "min_tokens"):
                if getattr(feat, name):
                    self.uses[name] -= 1
            if feat.top_k < self.vocab_size:
                _dec(self._top_ks, feat.top_k)
            if feat.lp_k >= 0:
                _dec(self._lp_ks, feat.lp_k)

    def _add(self, row: int, feat: _Features) -> None:
        self._rows[row] = feat
        for name in ("sampled", "top_p", "min_p", "rep", "additive", "bias", "min_tokens"):
            if getattr(feat, name):
                self.uses[name] += 1
        if feat.top_k < self.vocab_size:
            self._top_ks[feat.top_k] += 1
        if feat.lp_k >= 0:
            self._lp_ks[feat.lp_k] += 1

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a sample: each row (distinct) generated one more token, `tokens` [n] on the device."""
        self.n_out.index_add_(0, rows, torch.ones_like(rows))
        if self.counts is not None:
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)


def _widen(t: torch.Tensor, width: int, fill: float | int) -> torch.Tensor:
    """t [capacity, w] -> [capacity, width'] with width' >= width (powers of two), padded with `fill`."""
    w = max(8, 1 << (width - 1).bit_length())
    out = torch.full((t.shape[0], w), fill, dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out


def _rank_within(rows: torch.Tensor) -> torch.Tensor:
    """For entries grouped by row (consecutive), each one's index within its row's group."""
    n = rows.shape[0]
    idx = torch.arange(n, device=rows.device)
    start = torch.ones(n, dtype=torch.bool, device=rows.device)
    start[1:] = rows[1:] != rows[:-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(0).values
    return idx - first


def _dec(c: Counter[int], key: int) -> None:
    c[key] -= 1
    if not c[key]:
        del c[key]
