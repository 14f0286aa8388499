"""Turns one step's logits `[B, V]` into next tokens, applying each row's SamplingParams.

Order of operations for a row (each stage is skipped for the whole batch when no row needs it):

1. adjust (`Sampler.adjust_logits`): repetition penalty over prompt + output tokens (HF/vLLM: a seen
   token's logit is divided by the penalty when positive, multiplied when not), then the additive
   terms: `-(frequency_penalty * count + presence_penalty)` for each token already in the output
   (OpenAI), `+logit_bias[t]`, and `-inf` for eos and `stop_token_ids` while fewer than `min_tokens`
   tokens have been generated. With `ignore_eos` an eos does not finish the sequence, so it is not
   masked; stop tokens still finish it, so they are. Penalties come before the bias so that a bias is
   exactly additive on the final logit. Last, the grammar mask (`allowed`, one int32 bitmask
   `[B, ceil(V/32)]` for the whole batch, see structured/masks.py): a token whose bit is clear
   gets `-inf`; rows without a grammar are all ones.
2. temperature `T`: below `GREEDY_TEMPERATURE` (0 included) the row takes the argmax of the adjusted
   logits, ties to the lowest id. Otherwise logits are multiplied by `1/T`.
3. truncation: top_k (every token tied with the k-th largest survives), then top_p over what top_k
   left (the smallest prefix whose mass reaches top_p), then min_p (keep `p >= min_p * p_max`, done in
   log space; it commutes with the other two because renormalising keeps ratios to the max).
4. draw: Gumbel-max, `argmax(logits - log E)` with `E ~ Exp(1)`, which samples the softmax exactly.

Randomness: a seeded row draws `E` from its own generator seeded with a hash of (seed, choice index,
output position), so its tokens depend only on its own logits and that key, not on the batch it
shares or its place in it (every stage is row-wise and uses the same arithmetic in every path).
Unseeded rows share the sampler's global generator.

Logprobs are those of the adjusted distribution (after penalties, bias, the min_tokens mask and the
grammar mask, before temperature and truncation). vLLM reports the raw model's by default; we report what the
penalties made of it, which is what the greedy choice is made from. They are floored at
`LOGPROB_FLOOR` so that banned tokens stay JSON-serialisable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from mcserve.server.engine.sampling_params import SamplingParams

# Below this a row is greedy: 1/T would push float32 logits to inf.
GREEDY_TEMPERATURE = 1e-5
LOGPROB_FLOOR = -9999.0
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One sequence in this step's batch.

    `prompt_token_ids` is read only under a repetition penalty; a list, tuple or int64 numpy array.
    `choice_index`: which of the request's `n` choices this row is; a seeded request keys choice i on
    (seed, i), so its choices differ from each other yet each is reproducible.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: frozenset[int] = frozenset()
    choice_index: int = 0


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """Per row: the chosen token; when any row asked for logprobs, every row's chosen-token logprob
    and its own top-`logprobs` alternatives (best first; empty for rows that did not ask)."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a bijection on 64-bit ints that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def seeded_key(seed: int, choice_index: int) -> int:
    """A seeded row's key: the request's seed and the choice's index (a 64-bit unsigned int). The device
    sampler (runner/sampler_rows.py) keys its rows with it too and mixes the position in on the device."""
    return _mix64(_mix64(seed & _U64) ^ choice_index)


def row_seed(seed: int, choice_index: int, position: int) -> int:
    """Generator seed of a seeded row's draw at output `position` (a 64-bit unsigned int)."""
    return _mix64(seeded_key(seed, choice_index) ^ position)


@dataclass(slots=True)
class _Plan:
    """Host-side summary of one batch: plain lists, one entry per row unless said otherwise."""

    greedy: list[bool] = field(default_factory=list)
    inv_temp: list[float] = field(default_factory=list)  # 1.0 on greedy rows
    top_k: list[int] = field(default_factory=list)  # vocab size = off
    top_p: list[float] = field(default_factory=list)  # inf = off
    log_min_p: list[float] = field(default_factory=list)  # -inf = off
    lp_k: list[int] = field(default_factory=list)  # alternatives wanted, -1 = no logprobs
    seeded: list[tuple[int, int]] = field(default_factory=list)  # (row, generator seed), sampled rows
    rep: list[tuple[int, float, Sequence[int], Sequence[int]]] = field(default_factory=list)
    add_rows: list[int] = field(default_factory=list)  # additive terms, unique per (row, token)
    add_toks: list[int] = field(default_factory=list)
    add_vals: list[float] = field(default_factory=list)


def _additive(row: SamplingRow) -> dict[int, float]:
    """Token -> what to add to its logit: presence/frequency penalty, bias, min_tokens ban."""
    sp = row.params
    adj: dict[int, float] = {}
    if sp.presence_penalty or sp.frequency_penalty:
        for t, c in Counter(row.output_token_ids).items():
            adj[t] = -(sp.frequency_penalty * c + sp.presence_penalty)
    for t, b in sp.logit_bias.items():
        adj[t] = adj.get(t, 0.0) + b
    if len(row.output_token_ids) < sp.min_tokens:
        banned = sp.stop_token_ids if sp.ignore_eos else chain(sp.stop_token_ids, row.eos_token_ids)
        for t in banned:
            adj[t] = -math.inf
    return adj


def _plan(rows: Sequence[SamplingRow], vocab_size: int) -> _Plan:
    plan = _Plan()
    for i, row in enumerate(rows):
        sp = row.params
        greedy = sp.temperature < GREEDY_TEMPERATURE
        plan.greedy.append(greedy)
        if greedy:
            plan.inv_temp.append(1.0)
            plan.top_k.append(vocab_size)
            plan.top_p.append(math.inf)
            plan.log_min_p.append(-math.inf)
        else:
            plan.inv_temp.append(1.0 / sp.temperature)
            plan.top_k.append(vocab_size if sp.top_k == -1 else min(sp.top_k, vocab_size))
            plan.top_p.append(sp.top_p if sp.top_p < 1.0 else math.inf)
            plan.log_min_p.append(math.log(sp.min_p) if sp.min_p > 0.0 else -math.inf)
            if sp.seed is not None:
                plan.seeded.append((i, row_seed(sp.seed, row.choice_index, len(row.output_token_ids))))
        plan.lp_k.append(-1 if sp.logprobs is None else sp.logprobs)
        if sp.repetition_penalty != 1.0:
            plan.rep.append((i, sp.repetition_penalty, row.prompt_token_ids, row.output_token_ids))
        if sp.presence_penalty or sp.frequency_penalty or sp.logit_bias or sp.min_tokens:
            for t, v in _additive(row).items():
                assert 0 <= t < vocab_size, f"token id {t} out of range for vocab {vocab_size}"
                plan.add_rows.append(i)
                plan.add_toks.append(t)
                plan.add_vals.append(v)
    return plan


class Sampler:
    """Samples one token per row; see the module docstring for semantics.

    `logits` may be wider than `vocab_size` (a padded lm_head); the extra columns are ignored. They
    are never modified. One device->host transfer per call; host->device copies are non-blocking.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int | None = None) -> None:
        assert vocab_size >= 1, f"vocab_size must be >= 1, got {vocab_size}"
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed & _U64)
        self._row_generator = torch.Generator(device=self.device)  # reseeded for each seeded row
        # bit i of an int32 word (1 << 31 wraps to the sign bit, which is what the bitmask uses)
        self._bit_values = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32).to(self.device)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 allowed: torch.Tensor | None = None) -> SamplerOutput:
        """`allowed`: the grammar bitmask `[B, W]` int32 (host or device), None = no row has a grammar."""
        logits = self._check(logits, rows)
        if not rows:
            return SamplerOutput([])
        plan = _plan(rows, self.vocab_size)
        adjusted = self._adjust(logits, plan)
        if allowed is not None:
            adjusted = self._mask(adjusted, allowed)
        tokens = self._choose(adjusted, plan)  # [B] int64
        return self._collect(adjusted, tokens, plan)

    def adjust_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Logits after penalties, bias and the min_tokens mask `[B, vocab_size]` (logprobs' source)."""
        logits = self._check(logits, rows)
        return self._adjust(logits, _plan(rows, self.vocab_size)) if rows else logits

    def _check(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (
            f"logits {tuple(logits.shape)} for {len(rows)} rows")
        assert logits.shape[1] >= self.vocab_size, f"logits {tuple(logits.shape)}, vocab {self.vocab_size}"
        assert logits.device.type == self.device.type, f"logits on {logits.device}, sampler on {self.device}"
        return logits[:, : self.vocab_size].float()

    def _to_device(self, data: list | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _adjust(self, logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if not plan.rep and not plan.add_rows:
            return logits
        out = logits.clone()
        if plan.rep:
            lengths = [len(p) + len(o) for _, _, p, o in plan.rep]
            n = sum(lengths)
            lengths_t = self._to_device(lengths, torch.int64)
            rows = torch.repeat_interleave(
                self._to_device([i for i, _, _, _ in plan.rep], torch.int64), lengths_t, output_size=n)
            factor = torch.repeat_interleave(
                self._to_device([r for _, r, _, _ in plan.rep], torch.float32), lengths_t, output_size=n)
            # numpy flattens long prompts ~4x faster than torch.tensor(list) and takes arrays as they are.
            flat = np.concatenate([np.asarray(seq, dtype=np.int64) for _, _, p, o in plan.rep for seq in (p, o)])
            toks = self._to_device(torch.from_numpy(flat), torch.int64)
            # A token seen twice is written twice with the same value, so duplicates are harmless.
            seen = out[rows, toks]
            out[rows, toks] = torch.where(seen > 0, seen / factor, seen * factor)
        if plan.add_rows:
            idx = self._to_device([plan.add_rows, plan.add_toks], torch.int64)  # [2, N]
            vals = self._to_device(plan.add_vals, torch.float32)
            out.index_put_((idx[0], idx[1]), vals, accumulate=True)
        return out

    def _mask(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """A new tensor: `logits` where the bitmask's bit is set, -inf elsewhere, in one pass over the
        batch. Bits past the vocabulary are ignored; a bitmask narrower than it bans the rest."""
        b, v = logits.shape
        assert allowed.dtype == torch.int32 and allowed.dim() == 2 and allowed.shape[0] == b, (allowed.shape, b)
        words = self._to_device(allowed, torch.int32)
        ok = (words[:, :, None] & self._bit_values).view(b, -1).bool()  # [B, 32 W]
        if ok.shape[1] < v:
            ok = torch.nn.functional.pad(ok, (0, v - ok.shape[1]))
        return torch.where(ok[:, :v], logits, -math.inf)

    def _choose(self, adjusted: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if all(plan.greedy):
            return adjusted.argmax(dim=-1)
        if len(set(plan.inv_temp)) == 1:
            s = adjusted * plan.inv_temp[0]
        else:
            s = adjusted * self._to_device(plan.inv_temp, torch.float32)[:, None]
        self._truncate(s, plan)
        s.sub_(self._log_noise(s, plan))
        sampled = s.argmax(dim=-1)
        if any(plan.greedy):
            greedy = self._to_device(plan.greedy, torch.bool)
            sampled = torch.where(greedy, adjusted.argmax(dim=-1), sampled)
        return sampled

    def _truncate(self, s: torch.Tensor, plan: _Plan) -> None:
        """Sets tokens removed by top_k / top_p / min_p to -inf in place; s: [B, V] scaled logits."""
        vocab = self.vocab_size
        use_k = any(k < vocab for k in plan.top_k)
        if any(p != math.inf for p in plan.top_p):
            srt, idx = s.sort(dim=-1, descending=True, stable=True)  # stable: ties keep lowest id first
            if use_k:
                kth = srt.gather(1, self._to_device([k - 1 for k in plan.top_k], torch.int64)[:, None])
                srt.masked_fill_(srt < kth, -math.inf)
            probs = srt.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1).sub_(probs)
            top_p = self._to_device(plan.top_p, torch.float32)[:, None]
            srt.masked_fill_(mass_before >= top_p, -math.inf)
            s.scatter_(1, idx, srt)
        elif use_k:
            k_max = max(k for k in plan.top_k if k < vocab)
            top = s.topk(k_max, dim=-1).values  # [B, k_max]
            kth_idx = self._to_device([min(k, k_max) - 1 for k in plan.top_k], torch.int64)
            kth = top.gather(1, kth_idx[:, None])
            off = self._to_device([k >= vocab for k in plan.top_k], torch.bool)
            kth.masked_fill_(off[:, None], -math.inf)
            s.masked_fill_(s < kth, -math.inf)
        if any(m != -math.inf for m in plan.log_min_p):
            floor = s.amax(dim=-1, keepdim=True) + self._to_device(plan.log_min_p, torch.float32)[:, None]
            s.masked_fill_(s < floor, -math.inf)

    def _log_noise(self, s: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """log E, E ~ Exp(1) `[B, V]`: seeded rows from their own key, the rest from the global generator."""
        e = torch.empty_like(s)
        if len(plan.seeded) < len(plan.greedy):
            e.exponential_(generator=self._generator)
        for row, key in plan.seeded:
            self._row_generator.manual_seed(key)
            e[row].exponential_(generator=self._row_generator)
        # E == 0 has probability ~0 but would give log 0 = -inf and then -inf - -inf = NaN.
        return e.clamp_min_(torch.finfo(e.dtype).tiny).log_()

    def _collect(self, adjusted: torch.Tensor, tokens: torch.Tensor, plan: _Plan) -> SamplerOutput:
        k_max = min(max(plan.lp_k), self.vocab_size)
        if k_max < 0:
            return SamplerOutput(tokens.tolist())
        # log_softmax is monotone per row: take top-k of the logits and subtract logsumexp, which
        # spares writing a [B, V] log_softmax.
        lse = adjusted.logsumexp(dim=-1, keepdim=True)  # [B, 1]
        chosen = adjusted.gather(1, tokens[:, None]) - lse
        cols = [tokens[:, None].double(), chosen.clamp_min_(LOGPROB_FLOOR).double()]
        if k_max > 0:
            top = adjusted.topk(k_max, dim=-1)
            cols += [top.indices.double(), (top.values - lse).clamp_min_(LOGPROB_FLOOR).double()]
        # float64 holds token ids exactly, so everything comes back in one transfer.
        host = torch.cat(cols, dim=1).tolist()  # [B, 2 + 2 * k_max]
        token_ids = [int(r[0]) for r in host]
        logprobs = [r[1] for r in host]
        top_logprobs = []
        for r, k in zip(host, plan.lp_k, strict=True):
            k = max(min(k, k_max), 0)
            ids, vals = r[2 : 2 + k], r[2 + k_max : 2 + k_max + k]
            top_logprobs.append([(int(t), v) for t, v in zip(ids, vals, strict=True)])
        return SamplerOutput(token_ids, logprobs, top_logprobs)
