"""Small random models and a driver that runs sequences through prefill + batched decode."""

from __future__ import annotations

import copy

import torch

from mcserve.server.model.init_model import build_config, init_weights
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

VOCAB = 101


def tiny_model(mc: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=1.5)
    fields.update(overrides)
    cfg = build_config("tiny", VOCAB, mc, **fields)
    model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed, std=0.3)  # large weights so that every path's differences show
    return model.to(dtype).eval()


def as_dtype(model: MCGatedDeltaNetForCausalLM, dtype: torch.dtype) -> MCGatedDeltaNetForCausalLM:
    return copy.deepcopy(model).to(dtype)


def run_paths(model, seqs: list[list[int]], prompt_lens: list[int], chunk: int | None = None,
              num_slots: int = 7, ckpt_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Prefill each sequence's prompt (in chunks ending on segment boundaries, `chunk` segments at
    most), then decode the rest of all sequences in one batch, teacher-forced. Returns per sequence
    the logits [T, V] at every position, as the engine would see them."""
    C = model.spec.segment_size
    states = model.allocate_states(num_slots)
    total_blocks = sum(len(s) // C + 1 for s in seqs) + 2
    ckpts = model.allocate_checkpoints(total_blocks, ckpt_dtype)
    for t in (states.ssm, states.key_sum, ckpts.ssm, ckpts.key):
        t.fill_(float("nan"))  # poison: every read must come from something written
    free_blocks = list(range(total_blocks))[::-1]
    slots = [num_slots - 1 - 2 * i for i in range(len(seqs))]
    tables: list[list[int]] = [[] for _ in seqs]
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for i, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
        states.clear(slots[i])
        pos = 0
        while pos < plen:
            end = plen if chunk is None else min(plen, (pos // C + chunk) * C)
            writes = [free_blocks.pop() for e in range(pos + 1, end + 1) if e % C == 0]
            out, _ = model.prefill(seq[pos:end], slots[i], pos, tables[i], writes, states, ckpts, all_logits=True)
            tables[i] += writes
            logits[i].append(out)
            pos = end
    pos = list(prompt_lens)
    while True:
        rows = [i for i, s in enumerate(seqs) if pos[i] < len(s)]
        if not rows:
            break
        width = max(len(tables[i]) for i in rows)
        table = torch.full((len(rows), width), -1, dtype=torch.long)
        writes = torch.full((len(rows),), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            table[r, : len(tables[i])] = torch.tensor(tables[i], dtype=torch.long)
            if pos[i] % C == C - 1:
                writes[r] = free_blocks.pop()
        out, _ = model.decode(torch.tensor([seqs[i][pos[i]] for i in rows]), torch.tensor([slots[i] for i in rows]),
                              torch.tensor([pos[i] for i in rows]), table, writes, states, ckpts)
        for r, i in enumerate(rows):
            logits[i].append(out[r : r + 1])
            if writes[r] >= 0:
                tables[i].append(int(writes[r]))
            pos[i] += 1
    return [torch.cat(x) for x in logits]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
