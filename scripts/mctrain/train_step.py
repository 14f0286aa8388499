"""One training step of scripts/train.py and scripts/recall_experiment.py: static shapes, no host sync.

Both trainers are bound by kernel launches and Python on the H200, not by the GPU, so the step is
written to be captured whole (forward, backward, gradient clipping, AdamW) in one CUDA graph:
- the loss is over all positions with masks / ignore_index (`hidden[mask]` would sync and change shape);
- metrics accumulate in a device tensor, read (one sync) only at log time;
- the learning rate lives in a device tensor (AdamW `fused=True, capturable=True` takes a tensor lr);
- `clip_grad_norm_` (foreach, error_if_nonfinite=False) computes and applies the clip on the device;
- inputs are copied into fixed device buffers (`copy_` from pinned host memory, non_blocking).

`TrainStep(...)(batch, lr)` runs one step. With the graph on, the first WARMUP steps run eagerly on
a side stream (PyTorch's whole-network capture recipe), then `graph_check` steps run eagerly AND,
from the same weights, optimizer state and batches, under the graph; the run keeps the graph only if
the losses agree within GRAPH_CHECK_RTOL, else it goes on from the eager result. A capture that fails
is reported and the run goes on eagerly: a graph problem costs speed, never the run.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mctrain.evaluation import autocast_for
from mctrain.mc_forward import hidden_states, logits

IGNORE = -100  # target id that scores nothing (F.cross_entropy's default ignore_index)
WARMUP = 3  # eager steps on a side stream before capture (lazy init of cuBLAS handles, optimizer state)
# Largest relative loss difference, per step, between the eager and the graph steps of the check.
# Both run the same kernels on the same data, so they differ only by non-deterministic reductions
# (atomics) in bf16 autocast, amplified over a few optimizer steps: a few bf16 ulps (2^-8 = 0.39%)
# at most. A wrong capture (stale input, a step not replayed) moves the loss by far more.
GRAPH_CHECK_RTOL = 1e-2

Batch = dict[str, torch.Tensor]  # host tensors of one step: name -> [B, T] tensor
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]  # -> (loss, metrics [K])


def add_step_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                    help="capture the whole training step in one CUDA graph (auto: on for CUDA)")
    ap.add_argument("--graph-check", type=int, help="steps run both eagerly and under the graph from the same "
                    "state before the graph is trusted (default 8 on CUDA, 0 on CPU)")


def use_graph(choice: str, device: torch.device) -> bool:
    if choice == "on" and device.type != "cuda":
        raise SystemExit(f"--cuda-graph on needs a CUDA device, got {device}")
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   capturable: bool) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (linear and embedding weights) only. On CUDA fused, with the lr
    in one device tensor shared by both groups (set_lr fills it), so that a graph can capture step()."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    cuda = device.type == "cuda"
    lr_value: float | torch.Tensor = torch.tensor(lr, dtype=torch.float32, device=device) if cuda else lr
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr_value, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
                             capturable=cuda and capturable)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a kernel on the stream, no sync; every group holds this one tensor
        else:
            group["lr"] = lr


def mqar_loss(backend: str, amp: torch.dtype | None) -> LossFn:
    """Pure MQAR (recall_experiment.py): cross-entropy at the query keys (targets != IGNORE), over
    all positions. Metrics [loss, accuracy at the query keys]."""

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = batch["targets"]
        with autocast_for(tgt.device, amp):
            lg = logits(model, hidden_states(model, batch["inputs"], backend)).float()  # [B, T, V]
        loss = F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
        with torch.no_grad():
            scored = tgt != IGNORE
            hits = ((lg.argmax(-1) == tgt) & scored).sum()
            acc = hits / scored.sum().clamp_min(1)
        return loss, torch.stack([loss.detach(), acc])

    return loss_fn


def lm_loss(backend: str, amp: torch.dtype | None, recall_weight: float, chat_rows: slice) -> LossFn:
    """train.py's mix: LM loss where lm_mask is 1 (text rows, assistant tokens of chat rows) plus
    recall_weight x the loss at the recall answers. Metrics [lm loss, recall loss, recall accuracy,
    chat loss (the lm loss of the chat rows)]."""

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tgt, lm_mask, rc_mask = batch["targets"], batch["lm_mask"], batch["recall_mask"]
        with autocast_for(tgt.device, amp):
            lg = logits(model, hidden_states(model, batch["inputs"], backend))
        nll = F.cross_entropy(lg.float().transpose(1, 2), tgt, reduction="none")  # [B, T]
        lm = (nll * lm_mask).sum() / lm_mask.sum().clamp_min(1)
        rc = (nll * rc_mask).sum() / rc_mask.sum().clamp_min(1)
        with torch.no_grad():
            hit = (lg.argmax(-1) == tgt).float()
            rc_acc = (hit * rc_mask).sum() / rc_mask.sum().clamp_min(1)
            m = lm_mask[chat_rows]
            chat = (nll[chat_rows] * m).sum() / m.sum().clamp_min(1)
        return lm + recall_weight * rc, torch.stack([lm.detach(), rc.detach(), rc_acc, chat])

    return loss_fn


class TrainStep:
    """Runs training steps and accumulates their metrics (module docstring). `read()` gives the mean
    of each metric since the last read and the last step's gradient norm (one host sync)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, grad_clip: float,
                 n_metrics: int, device: torch.device, graph: bool = False, graph_check: int = 0,
                 report: Callable[[dict], None] = lambda row: None) -> None:
        self.model, self.opt, self.loss_fn, self.grad_clip = model, opt, loss_fn, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device, self.report = device, report
        self.sums = torch.zeros(n_metrics, device=device)
        self.gnorm = torch.zeros((), device=device)
        self.n = 0  # steps since the last read
        self.static: Batch | None = None  # device input buffers, filled by copy_ each step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_check = graph_check
        self.mode = "warmup" if graph else "eager"  # warmup -> (check ->) graph, or eager
        self.warm = 0
        self.pending: list[tuple[Batch, float]] = []  # the check's batches, replayed under the graph

    def __call__(self, batch: Batch, lr: float) -> None:
        self.n += 1
        if self.mode == "eager":
            self._eager(batch, lr)
        elif self.mode == "graph":
            self._replay(batch, lr)
        elif self.mode == "warmup":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._eager(batch, lr)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm += 1
            if self.warm == WARMUP:
                self.mode = "check" if self.graph_check > 0 else "capture"
        elif self.mode == "capture":
            self._fill(batch)
            ok = self._capture()
            self.mode = "graph" if ok else "eager"
            self._replay(batch, lr) if ok else self._eager(batch, lr)
        else:
            self._check_step(batch, lr)

    def read(self) -> tuple[list[float], float]:
        """(mean of each metric since the last read, last gradient norm); resets the sums."""
        means = (self.sums / max(self.n, 1)).tolist()
        gnorm = float(self.gnorm)
        self.sums.zero_()
        self.n = 0
        return means, gnorm

    # -- one step --------------------------------------------------------------------------------

    def _fill(self, batch: Batch) -> None:
        cuda = self.device.type == "cuda"
        if self.static is None:
            self.static = {k: torch.empty_like(v, device=self.device) for k, v in batch.items()}
        for k, v in batch.items():
            self.static[k].copy_(v.pin_memory() if cuda else v, non_blocking=cuda)

    def _body(self) -> None:
        """Forward, backward, clip, optimizer step, metrics into the sums: the part a graph captures."""
        loss, metrics = self.loss_fn(self.model, self.static)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # no sync: the clip is a device op
        self.opt.step()
        with torch.no_grad():
            self.sums += metrics.float()
            self.gnorm.copy_(gnorm)

    def _eager(self, batch: Batch, lr: float) -> None:
        self._fill(batch)
        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        self._body()

    def _replay(self, batch: Batch, lr: float) -> None:
        self._fill(batch)
        set_lr(self.opt, lr)
        self.graph.replay()

    def _capture(self) -> bool:
        """Capture _body into self.graph (nothing runs: the step is executed by the first replay)."""
        t0 = time.time()
        torch.cuda.synchronize(self.device)
        self.opt.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
        except Exception as e:  # noqa: BLE001 - any capture failure means: train eagerly, and say why
            self.report(dict(event="graph", ok=False, reason=f"capture failed: {type(e).__name__}: {e}"))
            self.opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            return False
        self.graph = graph
        torch.cuda.empty_cache()  # the eager steps' blocks: the graph has its own pool now
        self.report(dict(event="graph", ok=True, capture_s=time.time() - t0))
        return True

    # -- the eager-vs-graph check ------------------------------------------------------------------

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step changes (in place, so the graph's addresses stay valid)."""
        opt_state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [p.data for p in self.params] + opt_state + [self.sums, self.gnorm]

    def _snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._state()]

    def _restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self._state(), snap, strict=True):
                t.copy_(s)

    def _check_step(self, batch: Batch, lr: float) -> None:
        if not self.pending:
            self.start = self._snapshot()
            self.eager_losses: list[torch.Tensor] = []
        before = self.sums[0].clone()
        self._eager(batch, lr)
        self.eager_losses.append(self.sums[0] - before)
        self.pending.append((batch, lr))
        if len(self.pending) == self.graph_check:
            self._finish_check()

    def _finish_check(self) -> None:
        end_eager = self._snapshot()
        self._restore(self.start)
        self._fill(self.pending[0][0])
        ok = self._capture()
        graph_losses: list[torch.Tensor] = []
        if ok:
            for batch, lr in self.pending:
                before = self.sums[0].clone()
                self._replay(batch, lr)
                graph_losses.append(self.sums[0] - before)
            eager = torch.stack(self.eager_losses).tolist()
            graphed = torch.stack(graph_losses).tolist()
            rel = [abs(g - e) / max(abs(e), 1e-12) for e, g in zip(eager, graphed, strict=True)]
            ok = all(math.isfinite(g) for g in graphed) and max(rel) <= GRAPH_CHECK_RTOL
            self.report(dict(event="graph_check", ok=ok, steps=len(eager), eager_loss=eager, graph_loss=graphed,
                             max_rel_diff=max(rel), rtol=GRAPH_CHECK_RTOL))
        if not ok:
            self.graph = None
            self._restore(end_eager)
            torch.cuda.synchronize(self.device)
        self.mode = "graph" if ok else "eager"
        self.pending, self.start, self.eager_losses = [], [], []
