"""fla's gated chunk backward on Hopper with Triton < 3.7.1 (fla issue #640): our `chunk_bwd_dqkwg`, and
the one function that puts it (or fla's own kernel with its guard lifted) in place.

fla 0.6's `chunk_bwd_dqkwg` (fla/ops/common/chunk_o.py) raises when g is given on Hopper with
3.4.0 <= Triton < 3.7.1: Triton miscompiles its kernel there. #640's bisection on Hopper swept the
block width (CONST_TILING, so BK and BV together, at head dim 100): 32 and 128 clean, 64 wrong
(dk max error 14.65, dg 5.47), with the autotune configs ruled out. fla takes BK = min(next_pow2(K), 128)
and BV likewise, so the chat model's head dim 64 lands on the bad width. `chunk_bwd_dqkwg_torch` is the
same contract in batched torch matmuls over chunks; `use_fla_backward` installs it by rebinding the name
in fla.ops.gated_delta_rule.chunk (the module whose backward calls it), or lifts fla's guard for
`lifted`. Neither is trusted by itself: scripts/train.py's pick_backend proves the result against the
torch core (outputs and gradients, `mc_forward.check_backend`) at the model's head shapes first.
"""

from __future__ import annotations

import math

import torch

FLA_BACKWARDS = ("ours", "lifted")  # train.py --fla-backward
_SAVED: dict = {}  # fla's own kernel and guard flag, as imported, before any rebinding


def use_fla_backward(mode: str) -> str:
    """Make fla's chunked gated delta rule backward run `mode` where fla would refuse it, and say what runs.

    `ours`: chunk_bwd_dqkwg_torch instead of fla's refused kernel (fla's guard stays for every other caller);
    `lifted`: fla's own Triton kernel with the guard lifted (TRITON_ABOVE_3_7_1 set in chunk_o), for head
    shapes that #640 leaves clean. Where fla does not refuse (not Hopper, or Triton outside [3.4.0, 3.7.1))
    fla's own kernel is restored and nothing is patched."""
    if mode not in FLA_BACKWARDS:
        raise ValueError(f"mode must be one of {FLA_BACKWARDS}, got {mode!r}")
    from fla.ops.common import chunk_o
    from fla.ops.gated_delta_rule import chunk as gdn_chunk

    saved = _SAVED.setdefault("fla", dict(kernel=gdn_chunk.chunk_bwd_dqkwg, above_3_7_1=chunk_o.TRITON_ABOVE_3_7_1))
    # fla's own refusal condition (chunk_o.chunk_bwd_dqkwg), from the flags as fla computed them
    refuses = bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not saved["above_3_7_1"])
    gdn_chunk.chunk_bwd_dqkwg = chunk_bwd_dqkwg_torch if refuses and mode == "ours" else saved["kernel"]
    chunk_o.TRITON_ABOVE_3_7_1 = True if refuses and mode == "lifted" else saved["above_3_7_1"]
    if not refuses:
        return "fla's own chunk_bwd_dqkwg (no #640 guard applies here)"
    if mode == "ours":
        return "fla with mctrain.fla_backward.chunk_bwd_dqkwg_torch for the chunk_bwd_dqkwg it refuses (#640)"
    return "fla with its #640 guard lifted (its own chunk_bwd_dqkwg on Hopper + Triton < 3.7.1)"


def chunk_bwd_dqkwg_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, h: torch.Tensor,
                          dh: torch.Tensor, w: torch.Tensor | None = None, g: torch.Tensor | None = None,
                          g_gamma: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                          scale: float | None = None, state_v_first: bool = False,
                          cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64,
                          chunk_indices: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fla's gated `chunk_bwd_dqkwg`, same arguments and results, in fp32 (fp64 for fp64 inputs).

    Inputs in fla's layout, BT = chunk_size, N chunks in h's order (B x ceil(T/BT), or chunk_indices'
    (sequence, chunk) rows for varlen cu_seqlens with B = 1): q, k [B, T, H, K]; v (the forward's v_new),
    do, dv [B, T, HV, V]; w [B, T, HV, K]; g [B, T, HV] the log-decay cumulated within each chunk, in log2
    units (fla scales by 1/ln 2 and uses exp2); h [B, N', HV, V, K] (state_v_first, else [.., K, V]) the
    state at each chunk's start, dh the same layout: the gradient of the state at each chunk's end.
    Returns dq, dk [B, T, H, K] (q's, k's dtype), dw [B, T, HV, K] (w's dtype; None without w) and dg
    [B, T, HV] fp32: the gradients with respect to q, k, w and G = g ln 2 of, summed over chunks,
        sum_t do_t . o_t + <dh, S_end> - sum_t dv_t . (h w_t)
        o_t = scale (e^{G_t} h q_t + sum_{s<=t} e^{G_t - G_s} (q_t . k_s) v_s)
        S_end = e^{G_l} h + sum_s e^{G_l - G_s} v_s k_s^T         (l: the chunk's last token)
    with v, h, do, dh, dv fixed (fla reverse-cumsums dg within chunks afterwards)."""
    if g is None or g_gamma is not None:
        raise NotImplementedError("only the gated form (g given, no g_gamma) is replaced")
    B, T, H, K = k.shape
    HV = v.shape[2]
    G = HV // H
    scale = K**-0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tok = _chunk_tokens(B, T, chunk_size, cu_seqlens, chunk_indices, q.device)  # [N, BT]; B*T past the end
    n, L = tok.shape
    valid = tok < B * T  # [N, BT]
    with torch.autocast(device_type=q.device.type, enabled=False):  # fla's backward runs under autocast

        def take(x: torch.Tensor) -> torch.Tensor:  # [B, T, heads, ...] -> [N, heads, BT, ...], zero past the end
            flat = x.reshape(B * T, *x.shape[2:]).to(dt)
            flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
            return flat[tok].transpose(1, 2)

        def state(x: torch.Tensor) -> torch.Tensor:  # -> [N, HV, V, K]
            x = x.reshape(n, HV, *x.shape[-2:]).to(dt)
            return x if state_v_first else x.transpose(-1, -2)

        qc, kc = (take(x).repeat_interleave(G, dim=1) for x in (q, k))  # [N, HV, BT, K]: v-head i reads i // G
        vc, doc, gc = take(v), take(do), take(g) * math.log(2)  # [N, HV, BT, V] x2, [N, HV, BT] natural units
        hs, dhs = state(h), state(dh)
        last = (valid.sum(-1) - 1)[:, None, None].expand(n, HV, 1)  # [N, HV, 1]: the chunk's last token
        g_last = gc.gather(-1, last)  # [N, HV, 1]
        dq = (doc @ hs) * (torch.exp(gc) * scale)[..., None]  # through e^{G_t} h q_t
        dk = (vc @ dhs) * torch.exp(g_last - gc).masked_fill(~valid[:, None], 0)[..., None]  # through S_end
        dg_last = torch.exp(g_last[..., 0]) * (hs * dhs).sum((-1, -2)) + (dk * kc).sum((-1, -2))  # [N, HV]
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=q.device)) & valid[:, None, :, None] \
            & valid[:, None, None, :]  # [N, 1, BT(t), BT(s)]
        decay = torch.exp((gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, -math.inf))
        ds = (doc @ vc.transpose(-1, -2)) * decay * scale  # [N, HV, BT, BT]
        dq = dq + ds @ kc
        dk = dk + ds.transpose(-1, -2) @ qc
        dg = ((dq * qc).sum(-1) - (dk * kc).sum(-1)).scatter_add(-1, last, dg_last[..., None])  # [N, HV, BT]
        dw = None if w is None else -(take(dv) @ hs)

        def put(x: torch.Tensor) -> torch.Tensor:  # [N, HV, BT, ...] -> [B, T, HV, ...]; padding to a spare row
            rows = x.transpose(1, 2).flatten(0, 1)  # [N * BT, HV, ...]
            out = rows.new_zeros(B * T + 1, *rows.shape[1:])
            return out.index_copy_(0, tok.reshape(-1), rows)[: B * T].view(B, T, *rows.shape[1:])

        dq = put(dq).view(B, T, H, G, K).sum(3).to(q.dtype)
        dk = put(dk).view(B, T, H, G, K).sum(3).to(k.dtype)
        dw = None if dw is None else put(dw).to(w.dtype)
        dg = put(dg).to(torch.float64 if dt == torch.float64 else torch.float32)
    return dq, dk, dw, dg


def _chunk_tokens(B: int, T: int, L: int, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    """[N, L] flat token index (b * T + t) of each chunk's tokens, in h's chunk order, B * T past a
    sequence's end. Without cu_seqlens, or with chunk_indices given, no host sync (CUDA-graph safe)."""
    if cu_seqlens is None:
        nt = -(-T // L)
        seq_start = torch.arange(B, device=device)[:, None] * T
        starts = (seq_start + torch.arange(nt, device=device)[None, :] * L).reshape(-1)
        ends = (seq_start + T).expand(B, nt).reshape(-1)
    else:
        cu = cu_seqlens.long()
        if chunk_indices is None:  # fla's order: sequence by sequence, chunk by chunk
            lens = (cu[1:] - cu[:-1]).tolist()
            chunk_indices = torch.tensor([[i, c] for i, m in enumerate(lens) for c in range(-(-m // L))],
                                         dtype=torch.long, device=device)
        seq, c = chunk_indices[:, 0].long(), chunk_indices[:, 1].long()
        starts, ends = cu[seq] + c * L, cu[seq + 1]
    tok = starts[:, None] + torch.arange(L, device=device)
    return torch.where(tok < ends[:, None], tok, B * T)
