"""Batched prefill (every chunk of a step in one pass) == per-sequence prefill == the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from mcserve.server.model.batched_prefill import PrefillInput
from mcserve.server.model.layers import fuse_linears
from tests.server.model.helpers import VOCAB, as_dtype, rel_err, tiny_model

AGGS = ["none", "residual", "grm", "soup", "ssc"]


def _seqs(seed: int, lens: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


def _pools(model, n_slots: int, n_blocks: int, ckpt_dtype=None):
    states, ckpts = model.allocate_states(n_slots), model.allocate_checkpoints(n_blocks, ckpt_dtype)
    for t in (states.ssm, states.key_sum, states.conv, ckpts.ssm, ckpts.key, ckpts.conv):
        t.fill_(float("nan"))  # every read must come from something written
    return states, ckpts


def schedule(model, lens: list[int], chunk: list[int], stagger: int, holes: dict[int, set[int]]):
    """Chunks per step: sequence i starts at step i * stagger, then takes up to chunk[i] segments (ending
    on a boundary or at its end) per step. Returns [[(seq, start, end, reads, writes)]] with block ids."""
    C = model.spec.segment_size
    blocks = iter(range(10_000))
    tables: list[list[int]] = [[] for _ in lens]
    pos = [0] * len(lens)
    steps = []
    step = 0
    while any(p < n for p, n in zip(pos, lens, strict=True)):
        plan = []
        for i, n in enumerate(lens):
            if step < i * stagger or pos[i] >= n:
                continue
            a = pos[i]
            b = min(n, (a // C + chunk[i]) * C)
            writes = [next(blocks) for e in range(a + 1, b + 1) if e % C == 0]
            reads = [-1 if s in holes.get(i, set()) else blk for s, blk in enumerate(tables[i])]
            plan.append((i, a, b, reads, writes))
            tables[i] += writes
            pos[i] = b
        steps.append(plan)
        step += 1
    return steps


def run_batched(model, seqs, steps, top_k, ckpt_dtype=None, kernels=None):
    states, ckpts = _pools(model, len(seqs) + 2, 64, ckpt_dtype)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for plan in steps:
        chunks = []
        for i, a, b, reads, writes in plan:
            if a == 0:
                states.clear(i + 1)
            chunks.append(PrefillInput(seqs[i][a:b], i + 1, a, reads, writes, top_k[i], "all"))
        out = model.prefill_batch(chunks, states, ckpts, **({} if kernels is None else {"kernels": kernels}))
        for (i, *_), lg in zip(plan, out.logits, strict=True):
            logits[i].append(lg)
    return [torch.cat(x) for x in logits], states, ckpts, out


def run_per_sequence(model, seqs, steps, top_k, ckpt_dtype=None):
    states, ckpts = _pools(model, len(seqs) + 2, 64, ckpt_dtype)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for plan in steps:
        for i, a, b, reads, writes in plan:
            if a == 0:
                states.clear(i + 1)
            out, _ = model.prefill(seqs[i][a:b], i + 1, a, reads, writes, states, ckpts, top_k=top_k[i],
                                   all_logits=True)
            logits[i].append(out)
    return [torch.cat(x) for x in logits], states, ckpts


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("state_init", ["continue", "reset"])
def test_batched_equals_per_sequence_and_reference(agg: str, state_init: str) -> None:
    """Many sequences at different positions per pass; chunks of one and two segments that end on
    boundaries or at the prompt's end, prompts ending before, on and after a boundary, one token long."""
    C = 5
    model64 = tiny_model({"aggregation": agg, "segment_size": C, "top_k": 2, "state_init": state_init,
                          "router": "learned"}, seed=1, num_v_heads=4)
    model32 = as_dtype(model64, torch.float32)
    lens, top_k = [31, 23, 17, 10, 1], [3, 1, 2, 2, 2]
    seqs = _seqs(2, lens)
    steps = schedule(model64, lens, chunk=[1, 1, 2, 2, 1], stagger=1, holes={})
    assert max(len(p) for p in steps) >= 3  # really batched
    got64, st64, ck64, _ = run_batched(model64, seqs, steps, top_k)
    ref64, rst64, rck64 = run_per_sequence(model64, seqs, steps, top_k)
    got32, *_ = run_batched(model32, seqs, steps, top_k)
    for i, seq in enumerate(seqs):
        assert rel_err(got64[i], ref64[i]) < 1e-11
        assert rel_err(got32[i], ref64[i]) < 1e-5
        if top_k[i] == 2:  # the reference runs the model's k
            assert rel_err(got64[i], model64.forward_reference(seq)) < 1e-10
    for name in ("ssm", "key_sum", "conv"):
        assert torch.allclose(getattr(st64, name)[:, 1:6], getattr(rst64, name)[:, 1:6], atol=1e-11)
    written = [b for p in steps for *_, w in p for b in w]
    for name in ("ssm", "key", "conv"):
        assert torch.allclose(getattr(ck64, name)[written], getattr(rck64, name)[written], atol=1e-11)


@pytest.mark.parametrize("agg", ["grm", "ssc"])
def test_holes_and_bf16_checkpoints(agg: str) -> None:
    model64 = tiny_model({"aggregation": agg, "segment_size": 3, "top_k": 2}, seed=3)
    model32 = as_dtype(model64, torch.float32)
    lens, top_k = [20, 14, 9], [2, 1, 2]
    seqs = _seqs(4, lens)
    steps = schedule(model64, lens, chunk=[1, 1, 1], stagger=0, holes={0: {1, 2}, 2: {0}})
    got, *_ = run_batched(model32, seqs, steps, top_k, ckpt_dtype=torch.bfloat16)
    ref, *_ = run_per_sequence(model32, seqs, steps, top_k, ckpt_dtype=torch.bfloat16)
    for a, b in zip(got, ref, strict=True):
        assert rel_err(a, b) < 1e-5


def test_logits_only_where_asked_and_weights_per_table_entry() -> None:
    model = tiny_model({"aggregation": "ssc", "segment_size": 4, "top_k": 2}, seed=5)
    states, ckpts = _pools(model, 4, 16)
    for s in (0, 1, 2):
        states.clear(s)
    seqs = _seqs(6, [9, 6, 3])
    utility = torch.full((16,), 0.5, dtype=torch.float64)
    out = model.prefill_batch([PrefillInput(seqs[0], 0, 0, [], [0, 1], logits="last"),
                               PrefillInput(seqs[1], 1, 0, [], [2], logits="none"),
                               PrefillInput(seqs[2], 2, 0, [], [], logits="all")], states, ckpts, utility=utility)
    assert out.logits[0].shape == (1, VOCAB) and out.logits[1] is None and out.logits[2].shape == (3, VOCAB)
    ids, w = out.block_ids.view(3, -1), out.block_weights.view(3, -1)
    assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [2, -1] and ids[2].tolist() == [-1, -1]
    # later tokens read the checkpoints made earlier in their own chunk; the 3-token chunk reads nothing
    assert (w[0] > 0).all() and w[1, 0] > 0 and (w[1, 1:] == 0).all() and (w[2] == 0).all()
    want = torch.full((16,), 0.5, dtype=torch.float64)
    want[:3] += torch.stack([w[0, 0], w[0, 1], w[1, 0]])
    assert torch.allclose(utility, want)


def _interpreted_kernels():
    """The CUDA path's kernels (Triton readout, fused conv + q/k norms, conv windows, segment-key sums,
    norms, residual add + norm, SwiGLU; the core stays torch: fla needs a GPU), run by Triton's
    interpreter on CPU."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    norms = pytest.importorskip("mcserve.kernels.triton_norms")
    from mcserve.kernels import triton_step
    from mcserve.kernels.prefill.batched import TORCH_KERNELS, PrefillKernels
    from mcserve.kernels.prefill.triton import readout_triton
    from mcserve.kernels.prefill.triton_conv import conv_heads_triton, keep_windows_triton
    from mcserve.kernels.prefill.triton_keys import segment_keys_triton

    return PrefillKernels("interpreted", TORCH_KERNELS.core, readout_triton, TORCH_KERNELS.conv, norms.rmsnorm,
                          norms.gated_rmsnorm, norms.swiglu, conv_heads_triton, triton_step.add_rmsnorm,
                          triton_step.swiglu_fused, segment_keys_triton, keep_windows_triton)


@pytest.mark.parametrize("mc", [{"aggregation": "ssc", "top_k": 2}, {"aggregation": "none"},
                                {"aggregation": "grm", "router": "learned"},
                                {"aggregation": "ssc", "top_k": 1, "state_init": "reset", "router": "learned"},
                                {"aggregation": "ssc", "segment_size": 2}])  # many memories: the grouped readout
def test_every_triton_piece_in_the_model_equals_the_torch_path(mc: dict) -> None:
    """`prefill_batch` with the fused CUDA glue (one input matmul, conv + SiLU + q/k norms from the raw
    projections and the slots' conv states, fused residual norms) equals the torch path: logits, slot
    states, conv states and every checkpoint written; chunks of one token (conv taps reach into the
    state), sequences at different positions, a hole. The weights end up fused, values unchanged."""
    kernels = _interpreted_kernels()
    model = as_dtype(tiny_model({"segment_size": 4, **mc}, seed=9, num_v_heads=4), torch.float32)
    ref_model = as_dtype(model, torch.float32)
    lens, top_k = [11, 6, 9, 2], [2, 1, 2, 2]
    seqs = _seqs(10, lens)
    steps = schedule(model, lens, chunk=[2, 1, 2, 1], stagger=1, holes={2: {0}})
    want, st_w, ck_w, _ = run_batched(ref_model, seqs, steps, top_k)
    got, st_g, ck_g, _ = run_batched(model, seqs, steps, top_k, kernels=kernels)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5
    for name in ("ssm", "key_sum", "conv"):
        assert torch.allclose(getattr(st_g, name)[:, 1:5], getattr(st_w, name)[:, 1:5], atol=1e-5)
    written = [b for p in steps for *_, w in p for b in w]
    for name in ("ssm", "key", "conv"):
        assert torch.allclose(getattr(ck_g, name)[written], getattr(ck_w, name)[written], atol=1e-5)
    attn = model.model.layers[0].attn
    fused = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.a_proj.weight.untyped_storage().data_ptr() == fused  # views of one weight
    assert torch.equal(attn.a_proj.weight, ref_model.model.layers[0].attn.a_proj.weight)
    again = fuse_linears(attn.in_linears())  # what the next step's call does: no copy
    assert again.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused
