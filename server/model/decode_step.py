"""One decode token for a batch of rows through every layer, shaped for a CUDA graph: every tensor's
shape is fixed by (rows, table width), nothing syncs with the host, and the layer core is a decode
path with `kernels/decode/contract.py`'s signature (Triton on CUDA, torch on CPU).

Against `model.decode` (the torch reference, which it equals): each layer's input projections are
one matmul (q, k, v, a, b, g and u weights re-pointed to views of one fused tensor by
`layers.fuse_linears`, gate and up of the MLP likewise: no extra memory), the glue runs as fused row
kernels on CUDA (kernels/triton_step.py, kernels/triton_norms.py; the model's torch modules on CPU),
padded rows (slot -1) touch no slot, router weights go straight into the per-block utility tensor,
and a boundary row's conv state goes into its checkpoint block from the conv step itself (before, a
gather and a scatter of every row's conv state per step: two kernels of ~120 us each at B=64 on the
H200). The fused weights span a multiple of `layers.FUSED_ROWS_ALIGN` rows (their padding outputs
never read; the same tensors the packed prefill uses): the 1.3b preset's projection row of 9,228 bf16
is not 16-byte aligned, and its B=64 profile had one extra copy kernel per layer and an sm80 cuBLAS
kernel for that GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mcserve.kernels.decode.contract import DecodeBatch, DecodeFn, LayerMemory
from mcserve.kernels.prefill.packed import conv_taps
from mcserve.server.model.cache_tensors import CheckpointBlocks, StateSlots
from mcserve.server.model.layers import GatedRMSNorm, RMSNorm, ShortConv, fuse_linears

if TYPE_CHECKING:
    from mcserve.kernels.triton_mm import MatmulTable, MMConfig
    from mcserve.server.model.model import MCGatedDeltaNetForCausalLM


@dataclass(frozen=True, slots=True)
class Glue:
    """The elementwise pieces of a layer: (x [B, D], dx | None, norm) -> (x + dx, norm(x + dx));
    conv (x, pool [slots, D, W-1], slots, weight [D, W], bias, ckpt [blocks, D, W-1], write_blocks) ->
    silu(conv) with the pool updated, and ckpt[write_blocks[i]] for rows with a block;
    gated_norm (y [B, HV, dv], gate | None, o_norm) -> [B, HV, dv]; swiglu ([B, 2M]) -> [B, M]."""

    name: str
    add_norm: Callable[[torch.Tensor, torch.Tensor | None, RMSNorm], tuple[torch.Tensor, torch.Tensor]]
    conv: Callable[..., torch.Tensor]
    gated_norm: Callable[[torch.Tensor, torch.Tensor | None, RMSNorm], torch.Tensor]
    swiglu: Callable[[torch.Tensor], torch.Tensor]


def _torch_add_norm(x: torch.Tensor, dx: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if dx is None else x + dx
    return x, norm(x)


def _torch_conv(x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, ckpt: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
    """ShortConv.forward_step on the live rows (finding them syncs: CPU only)."""
    live = (slots >= 0).nonzero().squeeze(-1)
    win = torch.cat([pool[slots[live]].to(x.dtype), x[live][..., None]], dim=-1)  # [b, D, W]
    y = conv_taps(win, weight, bias)
    pool[slots[live]] = win[..., 1:]
    wr = (writes[live] >= 0).nonzero().squeeze(-1)
    ckpt[writes[live][wr]] = win[wr, :, 1:].to(ckpt.dtype)
    return torch.zeros_like(x).index_copy_(0, live, F.silu(y).to(x.dtype))


def _torch_gated_norm(y: torch.Tensor, gate: torch.Tensor | None, norm: RMSNorm) -> torch.Tensor:
    return norm(y, gate) if gate is not None else norm(y)


def _torch_swiglu(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    if gu.dtype == torch.float64:
        return F.silu(g) * u
    return (F.silu(g.float()) * u.float()).to(gu.dtype)


TORCH_GLUE = Glue("torch", _torch_add_norm, _torch_conv, _torch_gated_norm, _torch_swiglu)


def triton_glue() -> Glue:
    from mcserve.kernels import triton_norms, triton_step

    def gated(y: torch.Tensor, gate: torch.Tensor | None, norm: RMSNorm) -> torch.Tensor:
        if gate is None:
            return triton_norms.rmsnorm(y, norm.weight, norm.eps)
        assert isinstance(norm, GatedRMSNorm)
        return triton_norms.gated_rmsnorm(y, gate, norm.weight, norm.eps, norm.activation)

    return Glue("triton", lambda x, dx, norm: triton_step.add_rmsnorm(x, dx, norm.weight, norm.eps),
                triton_step.conv_step, gated, triton_step.swiglu_fused)


@dataclass(frozen=True, slots=True)
class _Layer:
    w_in: torch.Tensor  # [conv_dim (+ value_dim) (+ key_dim) + 2 HV + pad, hidden]: q k v | g | u | a b | pad
    w_gate_up: torch.Tensor  # [2 M + pad, hidden]
    w_conv: torch.Tensor | None  # [conv_dim, W]
    b_conv: torch.Tensor | None


class DecodeStep:
    def __init__(self, model: MCGatedDeltaNetForCausalLM, decode_fn: DecodeFn, glue: Glue = TORCH_GLUE,
                 matmuls: MatmulTable | None = None) -> None:
        """matmuls: a card's measured table (kernels/triton_mm.py): each matmul of a batch size runs
        the Triton config the table picks for it, or cuBLAS; the o and down projections may take
        split-K configs, whose fp32 sums the Triton add_norm rounds to the stream's dtype before
        adding (Triton glue only)."""
        self.model, self.decode_fn, self.glue = model, decode_fn, glue
        assert matmuls is None or glue.name == "triton", "Triton matmuls need the Triton glue (fp32 partial sums)"
        self.matmuls = matmuls
        self._plans: dict[tuple[int, torch.dtype], tuple[MMConfig | None, ...]] = {}
        cfg = model.cfg
        self.layers = []
        for block in model.model.layers:
            a = block.attn
            w_conv = b_conv = None
            if cfg.use_short_conv:
                convs: list[ShortConv] = [a.q_conv1d, a.k_conv1d, a.v_conv1d]
                w_conv = torch.cat([c.weight[:, 0, :].detach() for c in convs]).contiguous()
                b_conv = torch.cat([c.bias.detach() for c in convs]) if convs[0].bias is not None else None
            w_gate_up = fuse_linears([block.mlp.gate_proj, block.mlp.up_proj])
            self.layers.append(_Layer(fuse_linears(a.in_linears()), w_gate_up, w_conv, b_conv))
        self._cols = model.model.layers[0].attn.in_columns()  # offsets into a layer's projection row

    def plan(self, B: int, dtype: torch.dtype) -> tuple[MMConfig | None, ...]:
        """Per matmul of a B-row step (in, o, gate_up, down, head): the Triton config, or None = cuBLAS.
        The same for every layer (their weights have one shape)."""
        key = (B, dtype)
        if key not in self._plans:
            if self.matmuls is None:
                self._plans[key] = (None,) * 5
            else:
                m, lw, a = self.model, self.layers[0], self.model.model.layers[0]
                head = m.model.embeddings.weight if m.lm_head is None else m.lm_head.weight
                ws = [(lw.w_in, False), (a.attn.o_proj.weight, True), (lw.w_gate_up, False),
                      (a.mlp.down_proj.weight, True), (head, False)]
                self._plans[key] = tuple(self.matmuls.choose(w.shape[0], w.shape[1], B, dtype, split)
                                         for w, split in ws)
        return self._plans[key]

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, batch: DecodeBatch, states: StateSlots, ckpts: CheckpointBlocks,
                 ckpt_sum: torch.Tensor | None = None, utility: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B]; batch: the rows' metadata (slots -1 = padding); ckpt_sum [L, slots, HV, dv, dk] for
        residual; utility [blocks] fp32 gets the router weights. Returns logits [B, V] fp32."""
        m, cfg, glue = self.model, self.model.cfg, self.glue
        B = tokens.shape[0]
        H, HV, dk, dv = cfg.num_heads, cfg.num_v_heads_, cfg.head_dim, cfg.head_v_dim
        kd, hv, cols, m2 = cfg.key_dim, cfg.num_v_heads_, self._cols, 2 * cfg.mlp_size
        blocks = m.model.layers
        mm_in, mm_o, mm_gu, mm_down, mm_head = self.plan(B, m.model.embeddings.weight.dtype)
        x = m.model.embeddings(tokens)
        h = glue.add_norm(x, None, blocks[0].attn_norm)[1]
        for li, (block, lw) in enumerate(zip(blocks, self.layers, strict=True)):
            attn = block.attn
            p = _linear(h, lw.w_in, mm_in)  # [B, P]
            qkv = p[:, :cols.g]
            qkv = glue.conv(qkv, states.conv[li], batch.slots, lw.w_conv, lw.b_conv, ckpts.conv[:, li],
                            batch.write_blocks) if lw.w_conv is not None else F.silu(qkv)
            u = p[:, cols.u:cols.u + kd].view(B, H, dk) if attn.u_proj is not None else None
            memory = LayerMemory(states.ssm[li], states.key_sum[li], ckpts.ssm[:, li], ckpts.key[:, li],
                                 None if ckpt_sum is None else ckpt_sum[li], utility)
            y = self.decode_fn(qkv[:, :kd].view(B, H, dk), qkv[:, kd:2 * kd].view(B, H, dk),
                               qkv[:, 2 * kd:].view(B, HV, dv), p[:, cols.a:cols.b], p[:, cols.b:cols.b + hv], u,
                               attn.A_log, attn.dt_bias, spec=m.spec, batch=batch, memory=memory,
                               allow_neg_eigval=cfg.allow_neg_eigval, out_dtype=x.dtype)
            gate = p[:, cols.g:cols.u].view(B, HV, dv) if cfg.use_gate else None
            o = glue.gated_norm(y, gate, attn.o_norm).reshape(B, -1)
            nxt = blocks[li + 1].attn_norm if li + 1 < len(blocks) else m.model.norm
            x, h = glue.add_norm(x, _linear(o, attn.o_proj.weight, mm_o), block.mlp_norm)
            act = glue.swiglu(_linear(h, lw.w_gate_up, mm_gu)[:, :m2])  # the padding columns left out
            x, h = glue.add_norm(x, _linear(act, block.mlp.down_proj.weight, mm_down), nxt)
        w = m.model.embeddings.weight if m.lm_head is None else m.lm_head.weight
        return _linear(h, w, mm_head).float()


def _linear(x: torch.Tensor, w: torch.Tensor, cfg: MMConfig | None) -> torch.Tensor:
    """x @ w^T by cuBLAS (cfg None) or kernels/triton_mm.py (fp32 when cfg splits K)."""
    if cfg is None:
        return F.linear(x, w)
    from mcserve.kernels import triton_mm

    return triton_mm.mm(x, w, cfg)
