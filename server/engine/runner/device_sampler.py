"""Sampling for the whole batch on the device, from the per-row parameters `SamplerRows` keeps there.

The semantics are the CPU sampler's (server/engine/sampler.py's docstring: penalties, then bias and
the min_tokens ban, then the grammar mask; greedy argmax with ties to the lowest id; temperature,
top_k, top_p, min_p; Gumbel-max; logprobs of the adjusted distribution), with the same float
arithmetic in the same order, so greedy tokens and logprobs equal the CPU sampler's. What differs:

- the per-row inputs are gathered on the device from `SamplerRows` by row id (no per-step host
  lists); penalties read the device token counts instead of the host's token lists;
- the noise is counter-based (`counter_rng.py`): a hash of (row key, output position, token id),
  where a seeded row's key comes from (seed, choice index) and an unseeded row's is drawn once when it
  gets its row. So a seeded row gives the same tokens alone or in any batch, as on the CPU, but not the
  same tokens as the CPU sampler's generator;
- stages run when some live row (not only some row of this batch) needs them; a stage is an exact
  no-op on rows that do not use it.

One call returns device tensors; `OutputCopy.start` brings them back in one non-blocking
device->host copy and `to_host` waits for it and unpacks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcserve.server.engine.runner.counter_rng import row_hash, token_hash, uniform
from mcserve.server.engine.runner.sampler_rows import SamplerRows
from mcserve.server.engine.sampler import LOGPROB_FLOOR, SamplerOutput


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """tokens: [n] int64 on the device; packed: [n, 2 + 2k] float64 (token, its logprob, k top ids,
    k top logprobs) when some live row asks for logprobs, else None."""

    tokens: torch.Tensor
    packed: torch.Tensor | None
    k: int


class DeviceSampler:
    def __init__(self, rows: SamplerRows) -> None:
        self.rows = rows
        self.vocab_size = rows.vocab_size
        self._tokens = token_hash(rows.vocab_size, rows.device)
        self._bit_values = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32).to(rows.device)

    def __call__(self, logits: torch.Tensor, row_ids: torch.Tensor, allowed: torch.Tensor | None = None
                 ) -> DeviceSample:
        """logits [n, >= V] (columns past V ignored, never modified); row_ids [n] int64 on the device,
        distinct; allowed: the grammar bitmask [n, W] int32 or None. Advances each row's token count."""
        V = self.vocab_size
        assert logits.dim() == 2 and logits.shape[1] >= V and row_ids.shape == (logits.shape[0],), (
            logits.shape, row_ids.shape)
        adjusted = self._adjust(logits[:, :V].float(), row_ids)
        if allowed is not None:
            adjusted = self._mask(adjusted, allowed)
        tokens = self._choose(adjusted, row_ids)
        packed, k = self._logprobs(adjusted, tokens)
        self.rows.advance(row_ids, tokens)
        return DeviceSample(tokens, packed, k)

    def _adjust(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        R, uses, V = self.rows, self.rows.uses, self.vocab_size
        out = logits
        if uses["rep"]:
            assert R.counts is not None and R.in_prompt is not None
            fac = R.rep[ids][:, None]
            seen = (R.in_prompt[ids] | (R.counts[ids] > 0)) & (fac != 1.0)
            out = torch.where(seen, torch.where(logits > 0, logits / fac, logits * fac), logits)
        bias = uses["bias"] and R.bias_ids.shape[1]
        ban = uses["min_tokens"] and R.ban_ids.shape[1]
        if uses["additive"] or bias or ban:
            # column V collects the padding of the sparse lists and is dropped
            adj = torch.zeros(ids.shape[0], V + 1, dtype=torch.float64, device=logits.device)
            if uses["additive"]:
                assert R.counts is not None
                c = R.counts[ids].to(torch.float64)
                pen = -(R.freq[ids][:, None] * c + R.pres[ids][:, None])
                adj[:, :V] = torch.where(c > 0, pen, 0.0)
            if bias:
                adj.scatter_add_(1, R.bias_ids[ids], R.bias_vals[ids])
            if ban:
                active = (R.n_out[ids] < R.min_tokens[ids])[:, None]
                adj.scatter_(1, torch.where(active, R.ban_ids[ids], V), -math.inf)
            out = out + adj[:, :V].to(torch.float32)
        return out

    def _mask(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """`logits` where the bitmask's bit is set, -inf elsewhere (the CPU sampler's rule)."""
        b, v = logits.shape
        assert allowed.dtype == torch.int32 and allowed.dim() == 2 and allowed.shape[0] == b, (allowed.shape, b)
        words = allowed.to(logits.device, non_blocking=True) if allowed.device != logits.device else allowed
        ok = (words[:, :, None] & self._bit_values).view(b, -1).bool()
        if ok.shape[1] < v:
            ok = torch.nn.functional.pad(ok, (0, v - ok.shape[1]))
        return torch.where(ok[:, :v], logits, -math.inf)

    def _choose(self, adjusted: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        R = self.rows
        greedy = adjusted.argmax(dim=-1)
        if not R.uses["sampled"]:
            return greedy
        s = adjusted * R.inv_temp[ids][:, None]
        self._truncate(s, ids)
        u = uniform(row_hash(R.key_hi[ids], R.key_lo[ids], R.n_out[ids]), self._tokens)
        s.sub_(u.log_().neg_().log_())  # - log E, E = -log U ~ Exp(1): Gumbel-max
        return torch.where(R.greedy[ids], greedy, s.argmax(dim=-1))

    def _truncate(self, s: torch.Tensor, ids: torch.Tensor) -> None:
        """top_k, then top_p over what top_k left, then min_p, in place (-inf = removed)."""
        R, V = self.rows, self.vocab_size
        k_max = R.max_top_k
        k = R.top_k[ids]
        if R.uses["top_p"]:
            srt, idx = s.sort(dim=-1, descending=True, stable=True)  # stable: ties keep lowest id first
            if k_max:
                srt.masked_fill_(srt < srt.gather(1, (k - 1)[:, None]), -math.inf)
            probs = srt.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1).sub_(probs)
            srt.masked_fill_(mass_before >= R.top_p[ids][:, None], -math.inf)
            s.scatter_(1, idx, srt)
        elif k_max:
            top = s.topk(k_max, dim=-1).values  # [n, k_max]
            kth = top.gather(1, (k.clamp(max=k_max) - 1)[:, None])
            kth.masked_fill_((k >= V)[:, None], -math.inf)
            s.masked_fill_(s < kth, -math.inf)
        if R.uses["min_p"]:
            floor = s.amax(dim=-1, keepdim=True) + R.log_min_p[ids][:, None]
            s.masked_fill_(s < floor, -math.inf)

    def _logprobs(self, adjusted: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        k = min(self.rows.max_logprobs, self.vocab_size)
        if k < 0:
            return None, -1
        lse = adjusted.logsumexp(dim=-1, keepdim=True)
        chosen = adjusted.gather(1, tokens[:, None]) - lse
        cols = [tokens[:, None].double(), chosen.clamp_min_(LOGPROB_FLOOR).double()]
        if k > 0:
            top = adjusted.topk(k, dim=-1)
            cols += [top.indices.double(), (top.values - lse).clamp_min_(LOGPROB_FLOOR).double()]
        return torch.cat(cols, dim=1), k


@dataclass(frozen=True, slots=True)
class HostSample:
    """A DeviceSample's tensors on their way to (pinned) host memory; done once `event` has passed
    (None: on the host already)."""

    tokens: torch.Tensor
    packed: torch.Tensor | None
    k: int
    event: torch.cuda.Event | None


class OutputCopy:
    """The step's one device->host copy, non-blocking into pinned buffers. Two buffer sets are used
    in turn, so step n's results can be read while step n+1's are being written (async scheduling);
    a set is reused only after its previous copy has finished (its event)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._which = 0

    def start(self, sample: DeviceSample) -> HostSample:
        if not self._cuda:
            return HostSample(sample.tokens, sample.packed, sample.k, None)
        self._which ^= 1
        if (event := self._events[self._which]) is not None:
            event.synchronize()  # that copy was collected a step ago: done
        tokens = self._copy("tokens", sample.tokens)
        packed = None if sample.packed is None else self._copy("packed", sample.packed)
        event = self._events[self._which] = torch.cuda.Event()
        event.record()
        return HostSample(tokens, packed, sample.k, event)

    def _copy(self, name: str, src: torch.Tensor) -> torch.Tensor:
        bufs, n = self._sets[self._which], src.numel()
        buf = bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = bufs[name] = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())), dtype=src.dtype,
                                           pin_memory=True)
        out = buf[:n].view(src.shape)
        out.copy_(src, non_blocking=True)
        return out


def to_host(sample: HostSample, logprobs_asked: Sequence[int]) -> SamplerOutput:
    """Wait for the copy and unpack it. logprobs_asked: per row, how many top logprobs it asked for
    (-1 = none); rows that did not ask get empty alternatives, as from the CPU sampler."""
    if sample.event is not None:
        sample.event.synchronize()
    if sample.packed is None:
        return SamplerOutput(sample.tokens.tolist())
    host = sample.packed.tolist()  # float64 holds token ids exactly
    k = sample.k
    token_ids = [int(r[0]) for r in host]
    top = []
    for r, want in zip(host, logprobs_asked, strict=True):
        n = max(min(want, k), 0)
        top.append([(int(t), v) for t, v in zip(r[2:2 + n], r[2 + k:2 + k + n], strict=True)])
    return SamplerOutput(token_ids, [r[1] for r in host], top)
