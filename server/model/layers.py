"""Torch modules of the Gated DeltaNet block, with parameter names exactly as fla 0.6 saves them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcserve.kernels.gates import core_inputs
from mcserve.kernels.prefill.packed import conv_taps
from mcserve.server.model.config import ModelConfig

# Fused weights span a multiple of this many rows, so that a matmul's output rows are a multiple of 128
# bytes in bf16 and Triton sees row strides divisible by 16 (vectorised loads): with the 1.3b preset's
# 9,228 columns (8-byte rows) cuBLAS ran the packed prefill's input projection as an sm80 `align2`
# kernel (2.45 ms a layer at 17,600 tokens on the H200, the other GEMMs ran sm90 kernels). One value
# for every caller: fusing the same linears with another alignment would copy them again and leave
# the earlier fused tensor stale.
FUSED_ROWS_ALIGN = 64


def fuse_linears(linears: list[nn.Linear]) -> torch.Tensor:
    """One [sum out + pad, in] weight whose row blocks the linears' weights are views of, in order: the
    weights are re-pointed to it once (one matmul instead of several, no extra memory), and later calls
    return the same tensor without copying. The values do not change. It spans a multiple of
    FUSED_ROWS_ALIGN rows; the rows past the linears' (zeros when this call fused them; whatever follows
    in the storage when it is returned as a view) give output columns nobody reads."""
    ws = [lin.weight for lin in linears]
    rows = sum(w.shape[0] for w in ws)
    padded = rows + (-rows % FUSED_ROWS_ALIGN)
    w0 = ws[0]
    off = w0.storage_offset()
    adjacent = all(w.is_contiguous() and w.dtype == w0.dtype and w.device == w0.device
                   and w.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr() for w in ws)
    for w in ws:
        adjacent = adjacent and w.storage_offset() == off
        off += w.numel()
    room = (w0.storage_offset() + padded * w0.shape[1]) * w0.element_size() <= w0.untyped_storage().nbytes()
    if adjacent and room:
        return w0.as_strided((padded, w0.shape[1]), (w0.shape[1], 1), w0.storage_offset())
    with torch.inference_mode(False):  # plain tensors, so that load_state_dict can still write them
        fused = torch.cat([w.detach() for w in ws] + [w0.detach().new_zeros(padded - rows, w0.shape[1])])
    off = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[off:off + n], requires_grad=False)
        off += n
    return fused


@dataclass(frozen=True, slots=True)
class InColumns:
    """Column starts in the fused input projection's row: q k v at 0 (the conv input, g columns)."""

    g: int  # output gate (use_gate)
    u: int  # learned router query (u_proj)
    a: int  # HV columns each of a, then b
    b: int


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm over the head dim, then multiplied by act(gate) (fla's FusedRMSNormGated)."""

    def __init__(self, size: int, eps: float, activation: str) -> None:
        super().__init__(size, eps)
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xf = x.float() if x.dtype != torch.float64 else x
        gf = gate.to(xf.dtype)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        act = torch.sigmoid(gf) if self.activation == "sigmoid" else F.silu(gf)
        return (y * act).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise conv + SiLU. Weight [D, 1, W] as nn.Conv1d stores it."""

    def __init__(self, dim: int, width: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, 1, width))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward_seq(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], state [D, W-1] (the previous W-1 inputs) -> (y [T, D], padded input [T+W-1, D])."""
        xx = torch.cat([state.transpose(0, 1).to(x.dtype), x], dim=0)  # [T+W-1, D]
        y = conv_taps(xx.unfold(0, self.weight.shape[2], 1), self.weight[:, 0, :], self.bias)  # windows [T, D, W]
        return F.silu(y).to(x.dtype), xx

    def forward_step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D], state [B, D, W-1] -> (y [B, D], new state [B, D, W-1])."""
        win = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # [B, D, W]
        y = conv_taps(win, self.weight[:, 0, :], self.bias)
        return F.silu(y).to(x.dtype), win[..., 1:]



class GatedDeltaNetAttention(nn.Module):
    """Projections and output of one GDN layer; the recurrence itself lives in mcserve.kernels."""

    def __init__(self, cfg: ModelConfig, learned_router: bool) -> None:
        super().__init__()
        d, kd, vd, hv = cfg.hidden_size, cfg.key_dim, cfg.value_dim, cfg.num_v_heads_
        self.cfg = cfg
        self.q_proj = nn.Linear(d, kd, bias=False)
        self.k_proj = nn.Linear(d, kd, bias=False)
        self.v_proj = nn.Linear(d, vd, bias=False)
        self.a_proj = nn.Linear(d, hv, bias=False)
        self.b_proj = nn.Linear(d, hv, bias=False)
        self.A_log = nn.Parameter(torch.zeros(hv))
        self.dt_bias = nn.Parameter(torch.zeros(hv))
        if cfg.use_short_conv:
            self.q_conv1d = ShortConv(kd, cfg.conv_size, cfg.conv_bias)
            self.k_conv1d = ShortConv(kd, cfg.conv_size, cfg.conv_bias)
            self.v_conv1d = ShortConv(vd, cfg.conv_size, cfg.conv_bias)
        if cfg.use_gate:
            self.g_proj = nn.Linear(d, vd, bias=False)
            self.o_norm: RMSNorm = GatedRMSNorm(cfg.head_v_dim, cfg.norm_eps, cfg.output_gate_activation)
        else:
            self.o_norm = RMSNorm(cfg.head_v_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(vd, d, bias=False)
        self.u_proj = nn.Linear(d, kd, bias=False) if learned_router else None

    def in_linears(self) -> list[nn.Linear]:
        """The input projections in the fused order: q k v | g (output gate) | u (learned router) | a b.
        The 2 HV columns of a and b come last, so that every wide block starts at a multiple of the
        head widths (16-byte aligned column slices of the fused output); `in_columns` gives the starts."""
        out = [self.q_proj, self.k_proj, self.v_proj] + ([self.g_proj] if self.cfg.use_gate else [])
        return out + ([self.u_proj] if self.u_proj is not None else []) + [self.a_proj, self.b_proj]

    def in_columns(self) -> InColumns:
        """Where each projection starts in the fused input projection's output row (`in_linears`' order)."""
        cfg = self.cfg
        g = 2 * cfg.key_dim + cfg.value_dim
        u = g + (cfg.value_dim if cfg.use_gate else 0)
        a = u + (cfg.key_dim if self.u_proj is not None else 0)
        return InColumns(g=g, u=u, a=a, b=a + cfg.num_v_heads_)

    def _qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]

    def _convs(self) -> list[ShortConv]:
        return [self.q_conv1d, self.k_conv1d, self.v_conv1d]

    def conv_seq(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One sequence: x [T, d], conv_state [conv_dim, W-1] -> ([q, k, v] activated, padded inputs
        [T+W-1, conv_dim] from which the conv state after any token can be read)."""
        raw = self._qkv(x)
        if not self.cfg.use_short_conv:
            return [F.silu(r) for r in raw], torch.cat(raw, dim=-1)
        outs, pads = [], []
        for conv, r, st in zip(self._convs(), raw, self._split(conv_state, 0), strict=True):
            y, xx = conv.forward_seq(r, st)
            outs.append(y)
            pads.append(xx)
        return outs, torch.cat(pads, dim=-1)

    def conv_step(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """A batch of single tokens: x [B, d], conv_state [B, conv_dim, W-1] -> ([q, k, v], new state)."""
        raw = self._qkv(x)
        if not self.cfg.use_short_conv:
            return [F.silu(r) for r in raw], conv_state
        outs, states = [], []
        for conv, r, st in zip(self._convs(), raw, self._split(conv_state, 1), strict=True):
            y, ns = conv.forward_step(r, st)
            outs.append(y)
            states.append(ns)
        return outs, torch.cat(states, dim=1)

    def _split(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        kd, vd = self.cfg.key_dim, self.cfg.value_dim
        return list(torch.split(t, [kd, kd, vd], dim=dim))

    def heads(self, x: torch.Tensor, qkv: list[torch.Tensor], state_dtype: torch.dtype):
        """Per-head core inputs for rows x [R, d]: q, k (L2-normalised) [R, H, dk], v [R, HV, dv],
        g (log-decay), beta [R, HV] and router queries u [R, H, dk], all in `state_dtype`."""
        cfg = self.cfg
        R, H, dk = x.shape[0], cfg.num_heads, cfg.head_dim
        q, k, v = qkv
        u = self.u_proj(x).view(R, H, dk) if self.u_proj is not None else None
        return core_inputs(q.view(R, H, dk), k.view(R, H, dk), v.view(R, cfg.num_v_heads_, cfg.head_v_dim),
                           self.a_proj(x), self.b_proj(x), u, self.A_log, self.dt_bias, cfg.allow_neg_eigval,
                           state_dtype)

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [R, d] the layer input (for the output gate), y [R, HV, dv] the core output -> [R, d]."""
        y = y.to(x.dtype)
        if self.cfg.use_gate:
            gate = self.g_proj(x).view_as(y)
            o = self.o_norm(y, gate)
        else:
            o = self.o_norm(y)
        return self.o_proj(o.reshape(x.shape[0], -1))


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.mlp_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.mlp_size, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        act = (F.silu(gate.float()) * self.up_proj(x).float()).to(x.dtype) if x.dtype != torch.float64 \
            else F.silu(gate) * self.up_proj(x)
        return self.down_proj(act)


class GatedDeltaNetBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, learned_router: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GatedDeltaNetAttention(cfg, learned_router)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, learned_router: bool) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GatedDeltaNetBlock(cfg, learned_router) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
