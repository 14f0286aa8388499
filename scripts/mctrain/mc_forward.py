"""Batched, differentiable forward of `MCGatedDeltaNetForCausalLM` for training: ids [B, T] -> logits.

The same modules and weights as the serving model (server/model/layers.py: projections, short
convolutions, `heads()`, `output()`, MLPs); only the core differs in form. Memory Caching is computed
for all tokens of a batch at once:
- the delta rule runs over chunks that tile the segments (the torch core in one call; fla's chunk
  kernel one segment at a time), carrying the state across boundaries (`continue`) or starting from
  zero (`reset`); every segment's final state is its checkpoint C_i;
- router scores r = <u_t, p_i> against each earlier segment's mean key p_i, and against the running
  mean of the current segment's keys for the online memory; SSC keeps the top_k cached scores
  (a non-differentiable choice; gradients flow through gamma of the chosen ones);
- y_t = gamma_online o_t + sum_i gamma_i C_i (scale q_t), gamma a softmax over the chosen set.
`forward_reference` is the ground truth this must equal (tests/scripts/test_train_forward.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.packed import conv_taps
from mcserve.kernels.router import chosen_mask, mc_gamma
from mcserve.server.model.layers import GatedDeltaNetAttention
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mctrain.delta_rule import delta_rule, delta_rule_chunks


def default_backend(device: torch.device) -> str:
    """fla's kernel on CUDA when it is installed, else the torch core."""
    if device.type != "cuda":
        return "torch"
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return "torch"
    return "fla"


def hidden_states(model: MCGatedDeltaNetForCausalLM, ids: torch.Tensor, backend: str,
                  spec: MCSpec | None = None) -> torch.Tensor:
    """ids [B, T] -> final-normed hidden states [B, T, d] (the lm head's input)."""
    cfg, sd = model.cfg, model.state_dtype
    spec = spec or model.spec
    B, T = ids.shape
    x = model.model.embeddings(ids)
    for block in model.model.layers:
        attn = block.attn
        h = block.attn_norm(x)
        qkv = _conv(attn, h)
        rows = [t.reshape(B * T, -1) for t in qkv]
        q, k, v, g, beta, u = attn.heads(h.reshape(B * T, -1), rows, sd)
        q, k, u = (t.view(B, T, cfg.num_heads, cfg.head_dim) for t in (q, k, u))
        v = v.view(B, T, cfg.num_v_heads_, cfg.head_v_dim)
        g, beta = g.view(B, T, -1), beta.view(B, T, -1)
        y = mc_core(q, k, v, g, beta, u, spec, backend)
        x = x + attn.output(h.reshape(B * T, -1), y.reshape(B * T, *y.shape[2:])).view(B, T, -1)
        x = x + block.mlp(block.mlp_norm(x))
    return model.model.norm(x)


def logits(model: MCGatedDeltaNetForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    w = model.model.embeddings.weight if model.lm_head is None else model.lm_head.weight
    return hidden @ w.t().to(hidden.dtype)


def forward_logits(model: MCGatedDeltaNetForCausalLM, ids: torch.Tensor, backend: str | None = None,
                   spec: MCSpec | None = None) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, V] (fp32)."""
    backend = backend or default_backend(ids.device)
    return logits(model, hidden_states(model, ids, backend, spec)).float()


def _conv(attn: GatedDeltaNetAttention, h: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v after the causal short convolutions and SiLU, from zero conv state. [B, T, width] each.
    The taps summed as ShortConv.forward_seq sums them (`conv_taps`: in order, fp32; fp64 for fp64)."""
    raw = [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)]
    if not attn.cfg.use_short_conv:
        return [F.silu(r) for r in raw]
    outs = []
    for conv, r in zip((attn.q_conv1d, attn.k_conv1d, attn.v_conv1d), raw, strict=True):
        W = conv.weight.shape[2]
        xx = F.pad(r, (0, 0, W - 1, 0))  # [B, W-1+T, D], zero conv state
        y = conv_taps(xx.unfold(1, W, 1), conv.weight[:, 0, :], conv.bias)  # [B, T, D]
        outs.append(F.silu(y).to(r.dtype))
    return outs


def mc_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            u: torch.Tensor, spec: MCSpec, backend: str) -> torch.Tensor:
    """q, k, u [B, T, H, dk]; v [B, T, HV, dv]; g, beta [B, T, HV] -> y [B, T, HV, dv] (before o_norm)."""
    B, T, H, dk = q.shape
    scale = dk**-0.5
    if not spec.reads_cache:
        return delta_rule(q, k, v, g, beta, scale, None, backend)[0]
    C = spec.segment_size
    n = (T - 1) // C  # checkpoints some token reads: those of every segment but the last
    if backend == "torch":  # one call: chunks that tile every segment, the state kept across them
        L = max(d for d in range(1, min(C, 64) + 1) if C % d == 0)
        o, ends = delta_rule_chunks(q, k, v, g, beta, scale, None, L, C if spec.reset else 0)
        cached = ends[:, C // L - 1:: C // L][:, :n]  # [B, n, HV, dv, dk]: the state at each segment's end
    else:
        outs, ckpts, state = [], [], None
        for s0 in range(0, T, C):
            s1 = min(T, s0 + C)
            init = None if spec.reset else state
            o, state = delta_rule(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], g[:, s0:s1], beta[:, s0:s1], scale, init,
                                  backend)
            outs.append(o)
            ckpts.append(state)
        o = torch.cat(outs, dim=1)
        cached = torch.stack(ckpts[:n], dim=1) if n else None
    if n == 0:
        return o
    return _mix(o, q * scale, k, u, cached, spec)


def _mix(o: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, u: torch.Tensor, cached: torch.Tensor,
         spec: MCSpec) -> torch.Tensor:
    """o [B, T, HV, dv] online readouts; qs [B, T, H, dk] scaled queries; cached [B, N, HV, dv, dk]."""
    B, T, H, dk = qs.shape
    N, HV = cached.shape[1], cached.shape[2]
    G, C = HV // H, spec.segment_size
    seg = torch.arange(T, device=qs.device) // C
    valid = torch.arange(N, device=qs.device)[None, :] < seg[:, None]  # [T, N]: segment i < seg(t)
    with torch.autocast(device_type=qs.device.type, enabled=False):
        # the router in the state dtype, as the serving kernels compute it
        kf, uf = k.to(cached.dtype), u.to(cached.dtype)
        keys = kf[:, : N * C].reshape(B, N, C, H, dk).mean(2)  # [B, N, H, dk] segment keys p_i
        pad = (-T) % C
        run = F.pad(kf, (0, 0, 0, 0, 0, pad)).reshape(B, -1, C, H, dk).cumsum(2).reshape(B, -1, H, dk)[:, :T]
        count = (torch.arange(T, device=qs.device) % C + 1).to(run.dtype)
        r_online = (uf * run).sum(-1) / count[None, :, None]  # [B, T, H]
        r_cached = torch.einsum("bthk,bnhk->bthn", uf, keys)  # [B, T, H, N]
        rows_valid = valid[None].expand(B, T, N).reshape(B * T, N)
        if spec.aggregation == "residual":
            g_on = torch.ones(B, T, H, dtype=r_online.dtype, device=qs.device)
            g_c = rows_valid.view(B, T, 1, N).expand(B, T, H, N).to(r_online.dtype)
        else:
            chosen = chosen_mask(spec, r_cached.detach().reshape(B * T, H, N), rows_valid)
            g_on, g_c = mc_gamma(r_online.reshape(B * T, H), r_cached.reshape(B * T, H, N), chosen)
            g_on, g_c = g_on.view(B, T, H), g_c.view(B, T, H, N)
    g_on = g_on.repeat_interleave(G, dim=2)  # [B, T, HV]
    g_c = g_c.repeat_interleave(G, dim=2)  # [B, T, HV, N]
    qv = qs.repeat_interleave(G, dim=2)  # [B, T, HV, dk]
    # sum_i gamma_i C_i q_t = sum_i C_i (gamma_i q_t): one matmul per (b, v) over (i, dk)
    wq = (g_c[..., None] * qv[:, :, :, None, :].to(g_c.dtype)).to(cached.dtype)  # [B, T, HV, N, dk]
    y_c = torch.einsum("bnvdk,btvnk->btvd", cached, wq)
    return (g_on[..., None] * o.to(g_on.dtype) + y_c.to(g_on.dtype)).to(o.dtype)


def check_backend(backend: str, spec: MCSpec, heads: int, v_heads: int, dk: int, dv: int, device: torch.device,
                  B: int = 2, T: int = 200) -> dict:
    """Relative error of `mc_core` on `backend` (under bf16 autocast on CUDA) against the fp32 torch
    core, for outputs and input gradients, on random inputs: a 1-second guard before a long run.
    {out, grad: the largest over the inputs, grads: per input (q, k, v, g, beta, u)}."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, fn=lambda x: x):
        return fn(torch.randn(*shape, generator=gen)).to(device).requires_grad_()

    inputs = dict(q=rand(B, T, heads, dk, fn=lambda x: F.normalize(x, dim=-1)),
                  k=rand(B, T, heads, dk, fn=lambda x: F.normalize(x, dim=-1)),
                  v=rand(B, T, v_heads, dv), g=rand(B, T, v_heads, fn=lambda x: -F.softplus(x) * 0.1),
                  beta=rand(B, T, v_heads, fn=torch.sigmoid), u=rand(B, T, heads, dk))
    w = torch.randn(B, T, v_heads, dv, generator=gen).to(device)

    def run(name: str, amp: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            y = mc_core(*inputs.values(), spec, name)
        xs = list(inputs.values())
        grads = torch.autograd.grad((y.float() * w).sum(), xs, allow_unused=True)  # u is unused by `none`
        return y.float().detach(), [torch.zeros_like(x) if d is None else d for x, d in zip(xs, grads, strict=True)]

    y, grads = run(backend, device.type == "cuda")
    y_ref, grads_ref = run("torch", False)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    per_input = {name: rel(a, b) for name, a, b in zip(inputs, grads, grads_ref, strict=True) if b.norm() > 0}
    return dict(out=rel(y, y_ref), grad=max(per_input.values()), grads=per_input)
