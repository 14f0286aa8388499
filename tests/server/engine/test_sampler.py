from __future__ import annotations

import math

import pytest
import torch

from mcserve.server.engine.sampler import LOGPROB_FLOOR, Sampler, SamplingRow, row_seed
from mcserve.server.engine.sampling_params import SamplingParams

V = 1003  # odd vocab: no power-of-two luck in sort / topk / reductions
EOS = 7


def _row(output: tuple[int, ...] = (), prompt: tuple[int, ...] = (), choice: int = 0, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), prompt, output, frozenset({EOS}), choice)


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_and_ties_go_to_lowest_id() -> None:
    logits = _logits(9)
    logits[3, [11, 500, 900]] = 100.0  # three-way tie
    before = logits.clone()
    out = Sampler(V, "cpu", seed=0)(logits, [_row(temperature=0.0)] * 9)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 11
    assert out.logprobs is None and out.top_logprobs is None
    assert torch.equal(logits, before)  # the caller's logits are not modified
    half = logits.bfloat16()
    assert Sampler(V, "cpu")(half, [_row(temperature=0.0)] * 9).token_ids == half.float().argmax(-1).tolist()


def test_padded_logit_columns_are_ignored() -> None:
    logits = _logits(4, V + 21)
    logits[:, V:] = 1e4
    assert Sampler(V, "cpu", seed=0)(logits, [_row(temperature=0.0)] * 4).token_ids == \
        logits[:, :V].argmax(-1).tolist()
    out = Sampler(V, "cpu", seed=0)(logits, [_row(temperature=1.0)] * 4)
    assert all(t < V for t in out.token_ids)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_frequencies_match_softmax(temperature: float, seeded: bool) -> None:
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -3.0])
    n = 4000
    rows = [_row(temperature=temperature, seed=i if seeded else None) for i in range(n)]
    out = Sampler(8, "cpu", seed=1)(base.expand(n, 8).contiguous(), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).float()
    probs = (base / temperature).softmax(-1)
    # df = 7: P(chi2 > 24.3) = 0.001. The wrong temperature is far outside.
    assert _chi2(counts, probs) < 24.3
    other = (base / (1.5 - temperature)).softmax(-1)
    assert _chi2(counts, other) > 100.0


def test_mixed_temperatures_in_one_batch() -> None:
    base = torch.tensor([1.0, 0.0, -1.0, 0.5])
    temps = [0.3, 2.0]
    n = 3000
    rows = [_row(temperature=temps[i % 2]) for i in range(2 * n)]
    out = torch.tensor(Sampler(4, "cpu", seed=2)(base.expand(2 * n, 4).contiguous(), rows).token_ids)
    for j, t in enumerate(temps):
        counts = torch.bincount(out[j::2], minlength=4).float()
        assert _chi2(counts, (base / t).softmax(-1)) < 16.3  # df = 3, p = 0.001


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(16, seed=3)
    greedy = logits.argmax(-1).tolist()
    sampler = Sampler(V, "cpu", seed=3)
    assert sampler(logits, [_row(temperature=1.3, top_k=1)] * 16).token_ids == greedy
    assert sampler(logits, [_row(temperature=1.3, top_p=1e-6)] * 16).token_ids == greedy
    mixed = [_row(temperature=1.3, top_p=1e-6), _row(temperature=2.0, top_k=1)] * 8  # the sort path
    assert sampler(logits, mixed).token_ids == greedy


def test_ties_under_top_p_go_to_lowest_id_and_under_top_k_all_survive() -> None:
    logits = _logits(400, seed=3)
    logits[:, [40, 41]] = 50.0
    sampler = Sampler(V, "cpu", seed=3)
    assert set(sampler(logits, [_row(temperature=1.3, top_p=1e-6)] * 400).token_ids) == {40}
    # top_k keeps every token tied with the k-th (as HF and vLLM do), in both of its code paths.
    assert set(sampler(logits, [_row(top_k=1)] * 400).token_ids) == {40, 41}
    assert set(sampler(logits, [_row(top_k=1), _row(top_p=0.5)] * 200).token_ids[::2]) == {40, 41}


def test_top_k_and_top_p_restrict_the_support() -> None:
    base = torch.tensor([math.log(p) for p in (0.05, 0.5, 0.15, 0.3)])  # sorted: 1, 3, 2, 0
    n = 2000
    sampler = Sampler(4, "cpu", seed=4)
    top_k = set(sampler(base.expand(n, 4).contiguous(), [_row(top_k=2)] * n).token_ids)
    assert top_k == {1, 3}
    top_p = set(sampler(base.expand(n, 4).contiguous(), [_row(top_p=0.75)] * n).token_ids)
    assert top_p == {1, 3}
    # top_p applies to what top_k left: 0.5 / 0.8 of the two survivors reaches 0.6 alone.
    both = set(sampler(base.expand(n, 4).contiguous(), [_row(top_k=2, top_p=0.6)] * n).token_ids)
    assert both == {1}


def test_min_p_removes_low_tokens() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 3000
    rows = [_row(min_p=0.3)] * n  # keeps p >= 0.12
    out = Sampler(5, "cpu", seed=5)(probs.log().expand(n, 5).contiguous(), rows)
    assert set(out.token_ids) == {0, 1, 2}


def test_penalties_and_bias_match_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    row = _row(prompt=(0, 1), output=(3, 3, 4), repetition_penalty=2.0, presence_penalty=0.5,
               frequency_penalty=0.25, logit_bias={5: -1.5, 3: 0.25}, temperature=0.0, logprobs=0)
    sampler = Sampler(6, "cpu")
    # repetition over prompt + output {0, 1, 3, 4}, then -(0.25 * count + 0.5) over output, then bias.
    expected = torch.tensor([[2.0 / 2, -1.0 * 2, 0.5, 3.0 / 2 - (0.25 * 2 + 0.5) + 0.25,
                              -2.0 * 2 - (0.25 + 0.5), 1.0 - 1.5]])
    torch.testing.assert_close(sampler.adjust_logits(logits, [row]), expected)
    out = sampler(logits, [row])
    assert out.token_ids == [0]  # 3 was the raw argmax
    assert out.logprobs[0] == pytest.approx(float(expected.log_softmax(-1)[0, 0]), abs=1e-6)


def test_penalties_leave_other_rows_alone() -> None:
    logits = _logits(3, seed=6)
    rows = [_row(), _row(output=(1, 2), repetition_penalty=1.7, logit_bias={9: 3.0}), _row()]
    got = Sampler(V, "cpu").adjust_logits(logits, rows)
    assert torch.equal(got[[0, 2]], logits[[0, 2]])
    assert not torch.equal(got[1], logits[1])


def test_logit_bias_minus_100_bans_a_token() -> None:
    logits = _logits(200, seed=7, scale=1.0)
    logits[:, 17] = 8.0  # would be chosen nearly always
    sampler = Sampler(V, "cpu", seed=7)
    assert set(sampler(logits, [_row(temperature=0.0)] * 200).token_ids) == {17}
    banned = [_row(temperature=1.0, logit_bias={17: -100.0})] * 200
    assert 17 not in sampler(logits, banned).token_ids


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, 32)
    logits[0, EOS] = 30.0
    logits[0, 9] = 20.0
    sampler = Sampler(32, "cpu", seed=8)

    def pick(output: tuple[int, ...], **kw) -> int:
        return sampler(logits, [_row(output=output, temperature=0.0, min_tokens=3, **kw)]).token_ids[0]

    assert pick((1, 2)) == 9
    assert pick((1, 2, 3)) == EOS
    assert pick((1, 2), stop_token_ids=(9,)) not in (EOS, 9)
    # ignore_eos: eos does not finish, so it needs no mask; a stop token still would finish.
    assert pick((1, 2), ignore_eos=True) == EOS
    logits[0, EOS] = 0.0
    assert pick((1, 2), ignore_eos=True, stop_token_ids=(9,)) != 9


def _run_seeded(sampler: Sampler, steps: list[torch.Tensor], position: int, batch: int,
                seed: int) -> list[int]:
    """Runs a seeded row `[V]` logits per step inside a batch of random other rows, at `position`."""
    gen = torch.Generator().manual_seed(seed)
    got, output = [], ()
    for step in steps:
        others = [
            _row(temperature=0.0), _row(temperature=0.7, top_p=0.9), _row(temperature=1.2, top_k=5),
            _row(min_p=0.1, seed=int(torch.randint(1000, (1,), generator=gen))), _row(repetition_penalty=1.3),
        ]
        rows = [others[int(torch.randint(len(others), (1,), generator=gen))] for _ in range(batch)]
        logits = torch.randn(batch + 1, V, generator=gen) * 3
        logits[position] = step
        rows.insert(position, _row(output=output, temperature=0.9, top_k=50, seed=1234))
        token = sampler(logits, rows).token_ids[position]
        got.append(token)
        output += (token,)
    return got


def test_seeded_row_is_independent_of_its_batch() -> None:
    steps = [t for t in _logits(12, seed=9, scale=0.5)]  # flat-ish: many plausible tokens
    alone = _run_seeded(Sampler(V, "cpu", seed=10), steps, 0, 0, seed=11)
    assert alone == _run_seeded(Sampler(V, "cpu", seed=12), steps, 3, 6, seed=13)
    assert alone == _run_seeded(Sampler(V, "cpu", seed=14), steps, 9, 9, seed=15)
    assert len(set(alone)) > 6  # it did sample


def test_different_seeds_and_choices_differ() -> None:
    logits = _logits(1, seed=16, scale=0.3).expand(4, V).contiguous()
    rows = [_row(seed=1), _row(seed=2), _row(seed=1, choice=1), _row(seed=1, output=(5,))]
    tokens = Sampler(V, "cpu", seed=0)(logits, rows).token_ids
    assert len(set(tokens)) == 4
    assert len({row_seed(1, 0, 0), row_seed(2, 0, 0), row_seed(1, 1, 0), row_seed(1, 0, 1)}) == 4


def test_logprobs_are_normalised_sorted_and_contain_the_choice() -> None:
    logits = _logits(3, v=6, seed=17)
    rows = [_row(temperature=0.0, logprobs=6), _row(temperature=0.5, logprobs=2), _row()]
    out = Sampler(6, "cpu", seed=17)(logits, rows)
    assert out.logprobs is not None and out.top_logprobs is not None
    full = out.top_logprobs[0]
    assert sorted(t for t, _ in full) == list(range(6))
    assert sum(math.exp(lp) for _, lp in full) == pytest.approx(1.0, abs=1e-5)
    assert [lp for _, lp in full] == sorted((lp for _, lp in full), reverse=True)
    assert full[0] == (out.token_ids[0], pytest.approx(out.logprobs[0]))
    assert len(out.top_logprobs[1]) == 2 and out.top_logprobs[2] == []
    # Reported before temperature: row 1's logprob is the T = 1 distribution's.
    expected = float(logits[1].log_softmax(-1)[out.token_ids[1]])
    assert out.logprobs[1] == pytest.approx(expected, abs=1e-5)


def test_masked_logits_stay_nan_free() -> None:
    logits = _logits(6, seed=18)
    allowed = [3, 99, 500, 1002]
    mask = torch.ones(V, dtype=torch.bool)
    mask[allowed] = False
    logits[:, mask] = -math.inf
    rows = [_row(temperature=0.0, logprobs=8), _row(top_p=0.9, logprobs=1), _row(top_k=20, logprobs=3),
            _row(min_p=0.05), _row(temperature=3.0, seed=5, logprobs=0), _row(repetition_penalty=1.5,
            presence_penalty=1.0, output=(3, 4), logprobs=5)]
    for seed in range(5):
        out = Sampler(V, "cpu", seed=seed)(logits, rows)
        assert set(out.token_ids) <= set(allowed)
        assert all(math.isfinite(lp) for lp in out.logprobs)
        assert all(LOGPROB_FLOOR <= lp <= 0.0 for top in out.top_logprobs for _, lp in top)
        assert [t for t, _ in out.top_logprobs[0][:4]] == sorted(allowed, key=lambda t: -logits[0, t])


def test_empty_batch() -> None:
    assert Sampler(V, "cpu")(torch.empty(0, V), []).token_ids == []
