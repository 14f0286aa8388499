"""DecodeStep (the CUDA runner's static decode forward) against model.decode, the torch reference:
logits, states, key sums, conv states, checkpoints written and router weights per block, on random
pools with holes, boundaries, mixed positions, per-row k and padded rows; the torch path with the
torch glue exactly as the CPU serves it, and the Triton decode path with the Triton glue under the
interpreter (what the GPU runs)."""

from __future__ import annotations

import os

import pytest
import torch

from mcserve.kernels.decode import DecodeBatch, get_decode_path
from mcserve.kernels.decode.residual import rebuild_ckpt_sum
from mcserve.server.model.decode_step import TORCH_GLUE, DecodeStep, triton_glue
from mcserve.server.model.init_model import build_config, init_weights
from mcserve.server.model.layers import FUSED_ROWS_ALIGN
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

C = 8
CASES = {
    "ssc-learned": (dict(aggregation="ssc", segment_size=C, top_k=2, router="learned"), {}),
    "grm-grouped": (dict(aggregation="grm", segment_size=C, router="query"), dict(num_v_heads=4)),
    "residual": (dict(aggregation="residual", segment_size=C), dict(conv_bias=True)),
    "none": (dict(aggregation="none", segment_size=C), {}),
    "ssc-reset": (dict(aggregation="ssc", segment_size=C, top_k=3, state_init="reset"), dict(use_gate=False)),
}


def _model(case: str) -> MCGatedDeltaNetForCausalLM:
    mc, over = CASES[case]
    model = MCGatedDeltaNetForCausalLM(build_config("tiny", 97, mc, **over))
    init_weights(model, seed=3)
    with torch.no_grad():  # give the gates and norms something to do
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model.eval()


def _pools(model, slots: int, blocks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    states, ckpts = model.allocate_states(slots), model.allocate_checkpoints(blocks)
    for t in (states.ssm, states.key_sum, states.conv, ckpts.ssm, ckpts.key, ckpts.conv):
        t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return states, ckpts


def _clone(states, ckpts):
    from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots

    return (StateSlots(states.ssm.clone(), states.key_sum.clone(), states.conv.clone()),
            CheckpointBlocks(ckpts.ssm.clone(), ckpts.key.clone(), ckpts.conv.clone()))


def _rows():
    """5 live rows: positions with 0..5 cached segments, two boundaries, a hole; k per row."""
    slots = [4, 0, 6, 2, 5]
    positions = [3, C - 1, 2 * C + 5, 4 * C - 1, 5 * C + 2]
    tables = [[], [], [3, -1], [7, 1, 9], [10, 11, 12, 13, 14]]
    writes = [-1, 15, -1, 16, -1]
    ks = [2, 1, 2, 2, 1]
    return slots, positions, tables, writes, ks


def _reference(model, case, states, ckpts, tokens):
    slots, positions, tables, writes, ks = _rows()
    N = max(len(t) for t in tables)
    table = torch.tensor([t + [-1] * (N - len(t)) for t in tables])
    top_k = torch.tensor(ks) if model.spec.aggregation == "ssc" else None
    logits, w = model.decode(torch.tensor(tokens), torch.tensor(slots), torch.tensor(positions), table,
                             torch.tensor(writes), states, ckpts, top_k, top_k_max=max(ks))
    util = torch.zeros(ckpts.num_blocks, dtype=torch.float64)
    if model.spec.reads_cache and N:
        util.index_add_(0, table.clamp_min(0).reshape(-1), torch.where(table >= 0, w, 0.0).reshape(-1).double())
    return logits, util


def _step(model, step, states, ckpts, tokens, pad: list[int], width: int):
    """The same rows through DecodeStep, with padded rows inserted at `pad` and tables `width` wide."""
    slots, positions, tables, writes, ks = _rows()
    order = list(range(5))
    for p in pad:
        order.insert(p, -1)

    def col(values, fill):
        return torch.tensor([values[i] if i >= 0 else fill for i in order])

    table = torch.tensor([(tables[i] if i >= 0 else []) + [-1] * (width - (len(tables[i]) if i >= 0 else 0))
                          for i in order])
    batch = DecodeBatch(positions=col(positions, 0), slots=col(slots, -1), block_table=table,
                        write_blocks=col(writes, -1), top_k=col(ks, 1), top_k_max=model.spec.top_k)
    ckpt_sum = None
    if model.spec.aggregation == "residual":
        L = model.cfg.num_hidden_layers
        ckpt_sum = torch.zeros(L, states.num_slots, *states.ssm.shape[2:], dtype=torch.float32)
        for i in range(5):
            for li in range(L):
                rebuild_ckpt_sum(ckpt_sum[li, slots[i]], ckpts.ssm[:, li], tables[i])
    util = torch.zeros(ckpts.num_blocks, dtype=torch.float32)
    logits = step(col(tokens, 0), batch, states, ckpts, ckpt_sum, util)
    live = torch.tensor([i >= 0 for i in order])
    return logits[live], logits[~live], util


def _compare(model, path: str, glue, atol: float, matmuls=None) -> None:
    ref_states, ref_ckpts = _pools(model, 8, 17, seed=1)
    states, ckpts = _clone(ref_states, ref_ckpts)
    tokens = [5, 17, 3, 96, 40]
    want, want_util = _reference(model, None, ref_states, ref_ckpts, tokens)
    step = DecodeStep(model, get_decode_path(path), glue, matmuls=matmuls)
    got, padded, util = _step(model, step, states, ckpts, tokens, pad=[0, 3], width=7)
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    assert torch.isfinite(padded).all()
    for name in ("ssm", "key_sum", "conv"):
        torch.testing.assert_close(getattr(states, name), getattr(ref_states, name), atol=atol, rtol=atol)
    # checkpoints, keys and conv states of the boundary rows (15, 16); every other block untouched
    for name in ("ssm", "key", "conv"):
        torch.testing.assert_close(getattr(ckpts, name), getattr(ref_ckpts, name), atol=atol, rtol=atol)
    torch.testing.assert_close(util.double(), want_util, atol=atol, rtol=atol)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_equals_model_decode(case: str) -> None:
    _compare(_model(case), "torch", TORCH_GLUE, 1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_equals_model_decode(case: str) -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    _compare(_model(case), "triton", triton_glue(), 1e-5)  # measured ~3e-7 under the interpreter


def _forced_matmuls(model, rows: int):
    """A table (fp32, batches up to `rows`) in which Triton wins every matmul of `model`'s step: a
    split-K config where the step takes fp32 sums (o, down), else an unsplit one."""
    from mcserve.kernels.triton_mm import MatmulTable

    step = DecodeStep(model, get_decode_path("torch"))
    a, lw = model.model.layers[0], step.layers[0]
    head = model.model.embeddings.weight if model.lm_head is None else model.lm_head.weight
    shapes = {tuple(w.shape) for w in (lw.w_in, a.attn.o_proj.weight, lw.w_gate_up, a.mlp.down_proj.weight, head)}
    cfgs = {"bn16_bk32_s1_w4_st2": {"ms": 0.5}, "bn32_bk16_s3_w4_st2": {"ms": 0.4}}
    return MatmulTable({"device": "test", "dtype": "float32", "rows": [
        {"N": N, "K": K, "M": rows, "torch_ms": 1.0, "configs": cfgs} for N, K in shapes]})


@pytest.mark.parametrize("case", ["ssc-learned", "grm-grouped", "none"])
def test_triton_matmuls_equal_model_decode(case: str) -> None:
    """Every matmul of the step through kernels/triton_mm.py (o and down split-K into fp32, which the
    Triton add_norm takes), padded rows included."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    model = _model(case)
    table = _forced_matmuls(model, rows=8)
    step = DecodeStep(model, get_decode_path("triton"), triton_glue(), matmuls=table)
    plan = step.plan(7, torch.float32)
    assert [c is not None and c.split for c in plan] == [1, 3, 1, 3, 1], plan
    _compare(model, "triton", triton_glue(), 1e-5, matmuls=table)


def test_fused_weights_are_views_and_leave_model_decode_unchanged() -> None:
    model = _model("ssc-learned")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    step = DecodeStep(model, get_decode_path("torch"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == params
    attn = model.model.layers[0].attn
    assert attn.k_proj.weight.data_ptr() == step.layers[0].w_in.data_ptr() + attn.q_proj.weight.numel() * 4
    # rows padded to FUSED_ROWS_ALIGN with zeros (tiny + learned router: 228 rows -> 256), b last
    w_in = step.layers[0].w_in
    assert w_in.shape[0] == 256 == FUSED_ROWS_ALIGN * 4 and not w_in[228:].any()
    assert attn.b_proj.weight.data_ptr() + attn.b_proj.weight.numel() * 4 == w_in[228:].data_ptr()
    # every projection's columns of the fused output where in_columns says, q k v | g | u | a b
    x = torch.randn(5, attn.cfg.hidden_size, dtype=w_in.dtype)
    p, cols, kd, vd, hv = x @ w_in.T, attn.in_columns(), attn.cfg.key_dim, attn.cfg.value_dim, attn.cfg.num_v_heads_
    assert cols.g % 16 == cols.u % 16 == 0
    for lin, a in [(attn.q_proj, 0), (attn.k_proj, kd), (attn.v_proj, 2 * kd), (attn.g_proj, cols.g),
                   (attn.u_proj, cols.u), (attn.a_proj, cols.a), (attn.b_proj, cols.b)]:
        assert torch.allclose(p[:, a:a + lin.out_features], lin(x), atol=1e-6)
    assert cols.b + hv == 228 and cols.u == cols.g + vd
