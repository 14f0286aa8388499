"""The three execution paths agree: prefill + batched decode (fp32) == token-by-token reference (fp64)."""

from __future__ import annotations

import pytest
import torch

from tests.server.model.helpers import VOCAB, as_dtype, rel_err, run_paths, tiny_model

AGGS = ["none", "residual", "grm", "soup", "ssc"]


def _seqs(seed: int, lens: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("state_init", ["continue", "reset"])
def test_prefill_then_decode_matches_reference(agg: str, state_init: str) -> None:
    C = 5
    model64 = tiny_model({"aggregation": agg, "segment_size": C, "top_k": 2, "state_init": state_init,
                          "router": "learned"}, seed=1)
    model32 = as_dtype(model64, torch.float32)
    # prompts ending before (4), on (10) and after (13) a boundary, and one of a single token
    lens, prompts = [17, 23, 19, 9], [4, 10, 13, 1]
    seqs = _seqs(2, lens)
    got = run_paths(model32, seqs, prompts, chunk=2)
    for seq, out in zip(seqs, got, strict=True):
        ref = model64.forward_reference(seq)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-5
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("C", [1, 2, 3, 7, 64])
def test_segment_sizes(C: int) -> None:
    model64 = tiny_model({"aggregation": "ssc", "segment_size": C, "top_k": 3}, seed=3, num_v_heads=4)
    model32 = as_dtype(model64, torch.float32)
    seqs = _seqs(4, [15, 11])
    got = run_paths(model32, seqs, [9, 4], chunk=1)
    for seq, out in zip(seqs, got, strict=True):
        assert rel_err(out, model64.forward_reference(seq)) < 1e-5


def test_whole_prompt_in_one_prefill_equals_chunked_prefill() -> None:
    model = tiny_model({"aggregation": "grm", "segment_size": 4}, seed=5)
    seq = _seqs(6, [26])[0]
    one = run_paths(model, [seq], [26], chunk=None)[0]
    chunked = run_paths(model, [seq], [26], chunk=1)[0]
    assert rel_err(chunked, one) < 1e-12
    assert rel_err(one, model.forward_reference(seq)) < 1e-10


def test_bf16_checkpoints_are_what_every_path_reads() -> None:
    model64 = tiny_model({"aggregation": "ssc", "segment_size": 3, "top_k": 2}, seed=7)
    model32 = as_dtype(model64, torch.float32)
    seq = _seqs(8, [20])[0]
    got = run_paths(model32, [seq], [8], ckpt_dtype=torch.bfloat16)[0]
    ref_bf16 = model64.forward_reference(seq, ckpt_dtype=torch.bfloat16)
    ref_exact = model64.forward_reference(seq)
    assert rel_err(got, ref_bf16) < 1e-5
    assert rel_err(ref_bf16, ref_exact) > 1e-6  # the rounding is real, so the check above means something
