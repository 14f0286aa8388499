"""The device sampler against the CPU sampler (same semantics, same arithmetic): greedy tokens and
logprobs exactly equal under every adjustment; sampled rows follow the same distributions and a
seeded row gives the same tokens alone or in any batch. Runs on CPU tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mcserve.server.engine.runner.counter_rng import lowbias32, mul32, uniform
from mcserve.server.engine.runner.device_sampler import DeviceSampler, OutputCopy, to_host
from mcserve.server.engine.runner.sampler_rows import SamplerRows
from mcserve.server.engine.runner.staging import Staging
from mcserve.server.engine.sampler import Sampler, SamplingRow
from mcserve.server.engine.sampling_params import SamplingParams

V = 1003
EOS = 7
CPU = torch.device("cpu")


def _row(output: tuple[int, ...] = (), prompt: tuple[int, ...] = (), choice: int = 0, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), prompt, output, frozenset({EOS}), choice)


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


class Harness:
    """A device sampler over persistent rows, fed like a runner feeds it."""

    def __init__(self, capacity: int = 64, vocab: int = V, seed: int = 0) -> None:
        self.rows = SamplerRows(capacity, vocab, CPU, seed=seed)
        self.sampler = DeviceSampler(self.rows)
        self.staging = Staging(CPU)

    def set(self, rows: list[int], params: list[SamplingRow]) -> None:
        self.rows.set(rows, params, self.staging)
        self.staging.send()

    def sample(self, logits: torch.Tensor, rows: list[int], allowed: torch.Tensor | None = None):
        out = self.sampler(logits, torch.tensor(rows, dtype=torch.int64), allowed)
        return to_host(OutputCopy(torch.device("cpu")).start(out), self.rows.logprobs_asked(rows))


def _both(rows: list[SamplingRow], logits: torch.Tensor, allowed: torch.Tensor | None = None):
    cap = 2 * len(rows) + 1
    h = Harness(capacity=cap)
    ids = [2 * (len(rows) - i) - 1 for i in range(len(rows))]  # rows need not be 0..n-1 or in order
    h.set(ids, rows)
    return Sampler(V, "cpu", seed=0)(logits, rows, allowed), h.sample(logits, ids, allowed)


def _assert_same(cpu, dev) -> None:
    assert dev.token_ids == cpu.token_ids
    assert (dev.logprobs is None) == (cpu.logprobs is None)
    if cpu.logprobs is not None:
        assert dev.logprobs == cpu.logprobs
        assert dev.top_logprobs == cpu.top_logprobs


def test_hash_arithmetic_matches_python_integers() -> None:
    xs = [0, 1, 0xFFFF, 0x10000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    t = torch.tensor(xs, dtype=torch.int64)
    assert mul32(t, 0x846CA68B).tolist() == [(x * 0x846CA68B) & 0xFFFFFFFF for x in xs]

    def ref(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    assert lowbias32(t).tolist() == [ref(x) for x in xs]
    u = uniform(lowbias32(torch.arange(64)), lowbias32(torch.arange(4099)))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005  # 262K values


def test_greedy_equals_cpu_sampler_under_every_adjustment() -> None:
    logits = _logits(10, seed=1)
    logits[3, [11, 500, 900]] = 100.0  # a tie: lowest id
    rows = [
        _row(temperature=0.0),
        _row(temperature=0.0, output=(5, 5, 9), prompt=(1, 2, 3), repetition_penalty=1.7),
        _row(temperature=0.0, output=(4, 8, 8, 8), presence_penalty=0.7, frequency_penalty=-1.3),
        _row(temperature=0.0),
        _row(temperature=0.0, logit_bias={17: 5.5, 99: -2.25, 1002: 40.0}),
        _row(temperature=0.0, output=(1,), min_tokens=3, stop_token_ids=(9, 12)),
        _row(temperature=0.0, output=(1, 2, 3), min_tokens=3, stop_token_ids=(9,)),  # ban over
        _row(temperature=0.0, output=(6, 6), prompt=(6, 40), repetition_penalty=0.6, presence_penalty=0.2,
             frequency_penalty=0.4, logit_bias={6: 1.0, 40: -0.5}, min_tokens=5, ignore_eos=True),
        _row(temperature=0.0, logprobs=5),
        _row(temperature=0.0, logprobs=0, output=(3,), frequency_penalty=2.0),
    ]
    for r in (5, 7):  # make the bans bite: the banned tokens would win
        logits[r, [EOS, 9, 12]] = 60.0
    cpu, dev = _both(rows, logits)
    _assert_same(cpu, dev)
    assert dev.token_ids[3] == 11 and dev.token_ids[5] not in (EOS, 9, 12)


def test_adjusted_logits_equal_the_cpu_samplers_bit_for_bit() -> None:
    rows = [_row(output=(3, 3, 4), prompt=(0, 1), repetition_penalty=2.0, presence_penalty=0.5,
                 frequency_penalty=0.25, logit_bias={5: -1.5, 3: 0.25}), _row(), _row(logit_bias={0: 1e-3})]
    logits = _logits(3, seed=2)
    h = Harness()
    h.set([0, 1, 2], rows)
    got = h.sampler._adjust(logits[:, :V].float(), torch.tensor([0, 1, 2]))
    assert torch.equal(got, Sampler(V, "cpu").adjust_logits(logits, rows))


def test_grammar_mask_and_logprobs_equal_cpu() -> None:
    logits = _logits(6, seed=3)
    allowed = torch.zeros(6, (V + 31) // 32, dtype=torch.int32)
    allowed[:, 0] = 0b1011_0000  # tokens 4, 5, 7
    allowed[:, 31] = -1  # tokens 992..1002 (and past V, ignored)
    allowed[2] = -1  # row 2 unconstrained
    rows = [_row(temperature=0.0, logprobs=4)] * 3 + [_row(temperature=0.0, logprobs=0, min_tokens=2)] * 3
    cpu, dev = _both(rows, logits, allowed)
    _assert_same(cpu, dev)
    assert all(t in (4, 5, 992, 993, 994, 995, 996, 997, 998, 999, 1000, 1001, 1002)
               for i, t in enumerate(dev.token_ids) if i != 2)


def test_sampled_rows_follow_the_softmax_with_truncation() -> None:
    base = torch.tensor([math.log(p) for p in (0.05, 0.5, 0.15, 0.3)])
    n = 3000
    for kw, support in ((dict(top_k=2), {1, 3}), (dict(top_p=0.75), {1, 3}), (dict(top_k=2, top_p=0.6), {1}),
                        (dict(min_p=0.45), {1, 3})):
        h = Harness(capacity=n, vocab=4, seed=4)
        h.set(list(range(n)), [_row(**kw)] * n)
        assert set(h.sample(base.expand(n, 4).contiguous(), list(range(n))).token_ids) == support, kw
    h = Harness(capacity=n, vocab=4, seed=5)
    h.set(list(range(n)), [_row(temperature=0.5, seed=i) for i in range(n)])
    counts = torch.bincount(torch.tensor(h.sample(base.expand(n, 4).contiguous(), list(range(n))).token_ids),
                            minlength=4).float()
    probs = (base / 0.5).softmax(-1)
    chi2 = float(((counts - probs * n) ** 2 / (probs * n)).sum())
    assert chi2 < 16.3  # df 3, p = 0.001


def test_sampled_rows_respect_bans_and_report_adjusted_logprobs() -> None:
    n = 400
    logits = _logits(n, seed=7, scale=1.0)
    logits[:, [EOS, 9]] = 6.0
    rows = [_row(temperature=1.5, min_tokens=4, output=(1,), stop_token_ids=(9,), logprobs=2,
                 logit_bias={30: 4.0}, presence_penalty=1.0)] * n
    h = Harness(capacity=n)
    h.set(list(range(n)), rows)
    out = h.sample(logits, list(range(n)))
    assert not {EOS, 9} & set(out.token_ids) and 30 in out.token_ids
    expected = Sampler(V, "cpu").adjust_logits(logits, rows).log_softmax(-1)
    got = torch.tensor(out.logprobs, dtype=torch.float64)
    want = expected.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=0)


def test_top_k_keeps_ties_and_top_k_1_is_greedy() -> None:
    logits = _logits(200, seed=6)
    logits[:, [40, 41]] = 50.0
    h = Harness(capacity=200)
    h.set(list(range(200)), [_row(top_k=1)] * 200)
    assert set(h.sample(logits, list(range(200))).token_ids) == {40, 41}
    h2 = Harness(capacity=200)
    h2.set(list(range(200)), [_row(temperature=1.3, top_p=1e-6)] * 200)
    assert set(h2.sample(logits, list(range(200))).token_ids) == {40}


def _seeded_run(position: int, batch: int, seed: int, steps: list[torch.Tensor]) -> list[int]:
    """A seeded row among `batch` others (fresh rows each step), in a sampler of its own."""
    gen = torch.Generator().manual_seed(seed)
    h = Harness(capacity=64, seed=seed)
    me = 40 + position
    h.set([me], [_row(temperature=0.9, top_k=50, seed=1234, choice=2)])
    got = []
    for step in steps:
        others = [r for r in range(batch + 1) if r != position][:batch]
        params = [_row(temperature=float(torch.rand(1, generator=gen)) + 0.3, top_p=0.9, logprobs=1,
                       seed=int(torch.randint(1000, (1,), generator=gen))) for _ in others]
        for r in others:
            if r in h.rows:
                h.rows.clear([r])
        h.set(others, params)
        logits = torch.randn(len(others) + 1, V, generator=gen) * 3
        order = others[:position] + [me] + others[position:]
        logits[position] = step
        got.append(h.sample(logits, order).token_ids[position])
    return got


def test_seeded_row_is_independent_of_its_batch() -> None:
    steps = list(_logits(12, seed=9, scale=0.5))
    alone = _seeded_run(0, 0, 11, steps)
    assert alone == _seeded_run(3, 6, 12, steps)
    assert alone == _seeded_run(9, 20, 13, steps)
    assert len(set(alone)) > 6  # it did sample


def test_seeds_choices_and_positions_differ() -> None:
    logits = _logits(1, seed=16, scale=0.3).expand(4, V).contiguous()
    h = Harness(capacity=8)
    h.set([0, 1, 2, 3], [_row(seed=1), _row(seed=2), _row(seed=1, choice=1), _row(seed=1, output=(5,))])
    assert len(set(h.sample(logits, [0, 1, 2, 3]).token_ids)) == 4


def test_penalty_counts_follow_sampled_tokens() -> None:
    """The device counts grow with each sampled token, so a frequency penalty steers later steps as
    the CPU sampler (given the growing output) would."""
    h = Harness(capacity=4)
    rows = [_row(temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.3, prompt=(9,))]
    h.set([2], rows)
    out: tuple[int, ...] = ()
    cpu = Sampler(V, "cpu")
    for step in range(6):
        logits = _logits(1, seed=20 + step, scale=0.5)
        logits[0, 9] = 2.0
        logits[0, [10, 11]] = 2.2
        want = cpu(logits, [_row(output=out, temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.3,
                                 prompt=(9,))]).token_ids
        got = h.sample(logits, [2]).token_ids
        assert got == want, (step, out)
        out += tuple(got)
    assert len(set(out)) > 2


@pytest.mark.parametrize("cleared", [True, False])
def test_cleared_rows_stop_counting(cleared: bool) -> None:
    h = Harness(capacity=4)
    h.set([0, 1], [_row(top_p=0.5, logprobs=3), _row(temperature=0.0)])
    assert h.rows.uses["top_p"] == 1 and h.rows.max_logprobs == 3
    if cleared:
        h.rows.clear([0])
        assert h.rows.uses["top_p"] == 0 and h.rows.max_logprobs == -1 and h.rows.uses["sampled"] == 0
        assert h.sample(_logits(1), [1]).logprobs is None
