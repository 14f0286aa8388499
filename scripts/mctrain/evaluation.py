"""Held-out perplexity / bits per byte and associative-recall accuracy of a model.

Perplexity runs the batched training forward in eval mode (same weights, same math); recall runs
the serving path (`model.prefill` over a state slot and checkpoint blocks, as the engine does), so
that what is measured is what `mcserve serve` computes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mctrain.mc_forward import default_backend, hidden_states, logits
from mctrain.recall import RecallSeq, RecallTask
from mctrain.repeat import RepeatTask

DISTANCE_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def token_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-level BPE: one alphabet character is one byte;
    special tokens count 0). [V] int64."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()} if hasattr(
        tok, "get_added_tokens_decoder") else set()
    out = np.zeros(vocab, dtype=np.int64)
    for i in range(vocab):
        s = tok.id_to_token(i)
        out[i] = 0 if s is None or s in specials else len(s)
    return out


@torch.no_grad()
def heldout_nll(model: MCGatedDeltaNetForCausalLM, windows: list[tuple[str, np.ndarray]], bytes_of: np.ndarray,
                batch_size: int = 16, autocast_dtype: torch.dtype | None = torch.bfloat16,
                backend: str | None = None) -> dict:
    """Sum of next-token NLL (nats), token and byte counts over the windows, overall and per source.
    Returns {"loss", "ppl", "bpb", "tokens", "per_source": {name: {...}}}."""
    device = model.device
    backend = backend or default_backend(device)
    per: dict[str, list[float]] = {}
    for i in range(0, len(windows), batch_size):
        part = windows[i:i + batch_size]
        ids = torch.from_numpy(np.stack([w for _, w in part])).to(device)
        with autocast_for(device, autocast_dtype):
            lg = logits(model, hidden_states(model, ids[:, :-1], backend))
        nll = F.cross_entropy(lg.float().transpose(1, 2), ids[:, 1:], reduction="none").sum(1).double().cpu()
        for (name, w), s in zip(part, nll.tolist(), strict=True):
            acc = per.setdefault(name, [0.0, 0, 0])
            acc[0] += s
            acc[1] += len(w) - 1
            acc[2] += int(bytes_of[w[1:]].sum())
    return dict(_summary(*np.sum([v for v in per.values()], axis=0)) if per else {},
                per_source={k: _summary(*v) for k, v in per.items()})


@torch.no_grad()
def masked_nll(model: MCGatedDeltaNetForCausalLM, windows: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 16,
               autocast_dtype: torch.dtype | None = torch.bfloat16, backend: str | None = None,
               spec: MCSpec | None = None) -> dict:
    """Mean next-token NLL over the scored targets of (ids [W], mask [W]) windows: target t (= ids[t+1])
    counts where mask[t+1] (the chat data's assistant tokens). `spec` serves the weights with another
    aggregation (e.g. `none`). Returns {"loss", "ppl", "tokens"}."""
    device = model.device
    backend = backend or default_backend(device)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        part = windows[i:i + batch_size]
        ids = torch.from_numpy(np.stack([w for w, _ in part])).to(device)
        mask = torch.from_numpy(np.stack([m[1:] for _, m in part]).astype(np.float32)).to(device)
        with autocast_for(device, autocast_dtype):
            lg = logits(model, hidden_states(model, ids[:, :-1], backend, spec))
        nll = F.cross_entropy(lg.float().transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((nll * mask).sum())
        count += int(mask.sum())
    loss = total / max(count, 1)
    return dict(loss=loss, ppl=math.exp(loss), tokens=count)


def _summary(nll: float, tokens: int, nbytes: int) -> dict:
    loss = nll / max(tokens, 1)
    return dict(loss=loss, ppl=math.exp(loss), bpb=nll / math.log(2) / max(nbytes, 1), tokens=int(tokens))


@torch.no_grad()
def serving_logits(model: MCGatedDeltaNetForCausalLM, ids: np.ndarray | list[int]) -> torch.Tensor:
    """Logits [T, V] of one sequence through the serving prefill path (one slot, a checkpoint block per
    segment boundary, bf16 checkpoints on GPU as the server keeps them)."""
    T, C = len(ids), model.spec.segment_size
    n = T // C
    states = model.allocate_states(1)
    ckpts = model.allocate_checkpoints(max(n, 1), torch.bfloat16 if model.device.type == "cuda" else None)
    states.clear(0)
    out, _ = model.prefill(list(map(int, ids)), 0, 0, [], list(range(n)), states, ckpts, all_logits=True)
    return out


def recall_correct(model: MCGatedDeltaNetForCausalLM, seq: RecallSeq) -> np.ndarray:
    """Per query: whether the served model's next-token argmax at the query key is the value. [Q] bool."""
    lg = serving_logits(model, seq.ids)
    pred = lg[torch.as_tensor(seq.query_pos, device=lg.device)].argmax(-1).cpu().numpy()
    return pred == seq.answers


def recall_suite(task: RecallTask, heldout: np.ndarray, n_pairs: list[int], gaps: list[int], per_cell: int,
                 seed: int = 1234, prefix: int = 32, tail: int = 8) -> list[tuple[int, int, RecallSeq]]:
    """(n_pairs, gap, sequence) for every cell of the grid, filler text from held-out tokens. Ordered
    round by round (one sequence of every cell, then the next), so that a run cut short by a deadline
    still covers every cell."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(per_cell):
        for n in n_pairs:
            for gap in gaps:
                L = prefix + task.length_needed(n, n) + gap + tail
                if L > len(heldout):
                    raise ValueError(f"held-out text ({len(heldout)} tokens) is shorter than a {L}-token "
                                     "recall sequence")
                start = int(rng.integers(0, len(heldout) - L + 1))
                text = heldout[start:start + L].astype(np.int64)
                out.append((n, gap, task.make(rng, text, n, gap, prefix)))
    return out


def recall_eval(model: MCGatedDeltaNetForCausalLM, suite: list[tuple[int, int, RecallSeq]],
                progress=None, deadline: float | None = None) -> dict:
    """Accuracy by (pairs, gap) cell, by pairs, by gap and by distance bin (DISTANCE_EDGES).
    Stops at `deadline` (time.time()) if given; `sequences` says how many were run."""
    cells: dict[tuple[int, int], list[int]] = {}
    dist_hits = np.zeros(len(DISTANCE_EDGES) - 1)
    dist_count = np.zeros(len(DISTANCE_EDGES) - 1)
    done = 0
    for n, gap, seq in suite:
        if deadline is not None and time.time() > deadline and done:
            break
        done += 1
        ok = recall_correct(model, seq)
        c = cells.setdefault((n, gap), [0, 0])
        c[0] += int(ok.sum())
        c[1] += len(ok)
        b = np.clip(np.searchsorted(DISTANCE_EDGES, seq.distance, side="right") - 1, 0, len(DISTANCE_EDGES) - 2)
        np.add.at(dist_hits, b, ok)
        np.add.at(dist_count, b, 1)
        if progress is not None:
            progress()
    ns = sorted({n for n, _ in cells})
    gaps = sorted({g for _, g in cells})

    def acc(keys) -> float | None:
        hits = sum(cells[k][0] for k in keys if k in cells)
        total = sum(cells[k][1] for k in keys if k in cells)
        return hits / total if total else None

    return dict(
        n_pairs=ns, gaps=gaps,
        grid=[[acc([(n, g)]) for g in gaps] for n in ns],
        by_pairs=[acc([(n, g) for g in gaps]) for n in ns],
        by_gap=[acc([(n, g) for n in ns]) for g in gaps],
        distance_edges=list(DISTANCE_EDGES),
        by_distance=[float(h / c) if c else None for h, c in zip(dist_hits, dist_count, strict=True)],
        distance_count=dist_count.astype(int).tolist(),
        overall=acc(list(cells)),
        sequences=done,
        queries=int(dist_count.sum()),
    )


@torch.no_grad()
def quick_recall_acc(model: MCGatedDeltaNetForCausalLM, seqs: list[RecallSeq],
                     autocast_dtype: torch.dtype | None = torch.bfloat16, backend: str | None = None) -> float:
    """Teacher-forced recall accuracy with the batched forward (for progress during training).
    All sequences must have the same length."""
    device = model.device
    ids = torch.from_numpy(np.stack([s.ids for s in seqs])).to(device)
    with autocast_for(device, autocast_dtype):
        lg = logits(model, hidden_states(model, ids, backend or default_backend(device)))
    hits = total = 0
    for r, s in enumerate(seqs):
        pred = lg[r, torch.as_tensor(s.query_pos, device=device)].argmax(-1).cpu().numpy()
        hits += int((pred == s.answers).sum())
        total += len(s.answers)
    return hits / max(total, 1)


def repeat_windows(task: RepeatTask, heldout: np.ndarray, window: int, n: int, seed: int = 4321,
                   gap: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """n held-out text windows of `window` tokens, each with the longest span that fits written twice
    (gap `gap`, at most an eighth of the window), as (ids, mask) for `masked_nll`: the mask holds the
    second copy's tokens after its first (those a model that copies can predict)."""
    rng = np.random.default_rng(seed)
    gap = min(gap, window // 8)
    span = min(task.max_span, (window - gap) // 2)
    out = []
    for start in rng.integers(0, len(heldout) - window, n):
        seq = task.make(heldout[start:start + window].astype(np.int64), span, gap, 0)
        mask = np.zeros(window, dtype=bool)
        mask[seq.copy_start + 1: seq.copy_start + span] = True
        out.append((seq.ids, mask))
    return out


def repeat_gain(model: MCGatedDeltaNetForCausalLM, windows: list[tuple[np.ndarray, np.ndarray]],
                autocast_dtype: torch.dtype | None = torch.bfloat16, backend: str | None = None) -> dict:
    """NLL of the repeated spans' second copies served with the model's own aggregation and as `none`:
    {own, none, gain = none - own} (nats per token; a positive gain: the cache helps)."""
    spec = model.spec
    own = masked_nll(model, windows, autocast_dtype=autocast_dtype, backend=backend)["loss"]
    if not spec.reads_cache:
        return dict(own=own, none=own, gain=0.0)
    plain = MCSpec("none", spec.segment_size, spec.top_k, spec.state_init)
    none = masked_nll(model, windows, autocast_dtype=autocast_dtype, backend=backend, spec=plain)["loss"]
    return dict(own=own, none=none, gain=none - own)
