"""The static training step (scripts/mctrain/train_step.py) against the masked losses and the loop it
replaced, on the real tiny models; the graph itself needs CUDA, so here: everything around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mctrain import mqar
from mctrain.checkpoint import init_model, train_config
from mctrain.mc_forward import hidden_states, logits
from mctrain.schedule import CosineSchedule
from mctrain.train_step import IGNORE, TrainStep, lm_loss, make_optimizer, mqar_loss, use_graph
from torch.utils._python_dispatch import TorchDispatchMode

from tests.server.model.helpers import rel_err

CPU = torch.device("cpu")
TASK = mqar.MQARTask(seq_len=48, n_filler=16, n_keys=32, n_values=32, max_prefix=4)


def recall_model(agg: str, seed: int = 0) -> torch.nn.Module:
    cfg = train_config("recall-small", TASK.vocab_size, 0, agg, 16, 2)
    return init_model(cfg, seed, "slow").train()


def mqar_batches(n: int, batch: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids, tgt = mqar.batch(TASK, rng, [int(c) for c in rng.integers(2, 9, batch)])
        out.append(dict(inputs=torch.from_numpy(ids), targets=torch.from_numpy(tgt)))
    return out


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def masked_mqar_loss(model, batch):
    """What recall_experiment.py computed before: only the query keys' hidden states are scored."""
    ids, tgt = batch["inputs"], batch["targets"]
    mask = tgt >= 0
    lg = logits(model, hidden_states(model, ids, "torch")[mask])
    return F.cross_entropy(lg.float(), tgt[mask]), (lg.argmax(-1) == tgt[mask]).float().mean()


@pytest.mark.parametrize("agg", ["grm", "none"])
def test_static_mqar_loss_equals_the_masked_loss_values_and_gradients(agg):
    model = recall_model(agg)
    batch = mqar_batches(1)[0]
    assert (batch["targets"] == IGNORE).sum() > 0 and (batch["targets"] != IGNORE).sum() > 0
    want, want_acc = masked_mqar_loss(model, batch)
    want.backward()
    g_want = grads(model)
    model.zero_grad(set_to_none=True)
    got, metrics = mqar_loss("torch", None)(model, batch)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert metrics.tolist() == pytest.approx([want.item(), want_acc.item()], rel=1e-6)
    for a, b in zip(grads(model), g_want, strict=True):
        assert rel_err(a, b) < 1e-5


def test_static_lm_loss_equals_the_masked_loss_values_and_gradients():
    """train.py's loss form, against the same losses over boolean-selected positions."""
    cfg = train_config("tiny", 300, 0, "ssc", 8, 2)
    model = init_model(cfg, 1, "slow").train()
    gen = torch.Generator().manual_seed(2)
    B, T = 6, 40
    ids = torch.randint(0, 300, (B, T + 1), generator=gen)
    lm = torch.zeros(B, T)
    rc = torch.zeros(B, T)
    rc[:2, torch.randint(0, T, (5,), generator=gen)] = 1.0  # rows 0-1 recall, 2-3 chat, 4-5 text
    lm[2:4] = (torch.rand(2, T, generator=gen) < 0.4).float()
    lm[4:] = 1.0
    batch = dict(inputs=ids[:, :-1], targets=ids[:, 1:], lm_mask=lm, recall_mask=rc)
    chat = slice(2, 4)

    lg = logits(model, hidden_states(model, batch["inputs"], "torch")).float()
    tgt = batch["targets"]
    lm_want = F.cross_entropy(lg[lm > 0], tgt[lm > 0])
    rc_want = F.cross_entropy(lg[rc > 0], tgt[rc > 0])
    chat_want = F.cross_entropy(lg[chat][lm[chat] > 0], tgt[chat][lm[chat] > 0])
    (lm_want + 0.5 * rc_want).backward()
    g_want = grads(model)
    model.zero_grad(set_to_none=True)
    loss, metrics = lm_loss("torch", None, 0.5, chat)(model, batch)
    loss.backward()
    assert metrics[[0, 1, 3]].tolist() == pytest.approx([lm_want.item(), rc_want.item(), chat_want.item()], rel=1e-6)
    assert loss.item() == pytest.approx((lm_want + 0.5 * rc_want).item(), rel=1e-6)
    for a, b in zip(grads(model), g_want, strict=True):
        assert rel_err(a, b) < 1e-5


def test_eager_step_reproduces_the_old_training_loop():
    """The first steps of recall_experiment.py's loop before this module (masked loss, float lr set
    per group, AdamW, clip) give the same losses and weights as TrainStep's eager path."""
    batches = mqar_batches(5)
    sched = CosineSchedule(3e-3, 2, 5, 0.1)

    old = recall_model("grm")
    decay = [p for p in old.parameters() if p.ndim == 2]
    rest = [p for p in old.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    old_losses = []
    for step, batch in enumerate(batches):
        loss, _ = masked_mqar_loss(old, batch)
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(old.parameters(), 1.0)
        opt.step()
        old_losses.append(loss.item())

    new = recall_model("grm")
    step_fn = TrainStep(new, make_optimizer(new, 3e-3, 0.1, CPU, capturable=False), mqar_loss("torch", None), 1.0,
                        2, CPU)
    new_losses = []
    for step, batch in enumerate(batches):
        step_fn(batch, sched.lr(step))
        (loss, _), gnorm = step_fn.read()
        new_losses.append(loss)
        assert gnorm > 0
    assert new_losses == pytest.approx(old_losses, rel=1e-5)
    assert len(set(np.round(old_losses, 4))) == len(old_losses)  # the weights did move between steps
    for a, b in zip(new.parameters(), old.parameters(), strict=True):
        assert rel_err(a.detach(), b.detach()) < 1e-4


def test_read_averages_the_steps_since_the_last_read():
    model = recall_model("none")
    step_fn = TrainStep(model, make_optimizer(model, 1e-3, 0.0, CPU, capturable=False), mqar_loss("torch", None),
                        1.0, 2, CPU)
    batches = mqar_batches(3)
    losses = []
    for b in batches:
        with torch.no_grad():
            losses.append(mqar_loss("torch", None)(model, b)[0].item())
        step_fn(b, 1e-3)
    (mean, _), _ = step_fn.read()
    assert mean == pytest.approx(np.mean(losses), rel=1e-5)
    assert step_fn.n == 0 and float(step_fn.sums.abs().sum()) == 0.0


def test_snapshot_and_restore_cover_every_tensor_a_step_changes():
    """The graph check runs the same steps twice from one state: restoring must give the same steps
    again, bit for bit on CPU (weights, AdamW moments and step counts, metric sums)."""
    model = recall_model("grm")
    step_fn = TrainStep(model, make_optimizer(model, 2e-3, 0.1, CPU, capturable=False), mqar_loss("torch", None),
                        1.0, 2, CPU)
    batches = mqar_batches(5)
    for b in batches[:2]:
        step_fn(b, 2e-3)
    snap = step_fn._snapshot()

    def run() -> list[float]:
        out = []
        for b in batches[2:]:
            before = step_fn.sums[0].clone()
            step_fn(b, 2e-3)
            out.append(float(step_fn.sums[0] - before))
        return out

    first = run()
    after_first = [t.clone() for t in step_fn._state()]
    step_fn._restore(snap)
    second = run()
    assert first == second
    for a, b in zip(step_fn._state(), after_first, strict=True):
        assert torch.equal(a, b)


def test_no_data_dependent_op_in_the_step():
    """Forward, backward and clip of every aggregation run no op whose output shape depends on
    tensor values or that reads a value to the host (each would sync, and break a CUDA graph)."""
    banned = ("nonzero", "masked_select", "_local_scalar_dense", "unique", "index.Tensor", "index_put")

    class Watch(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    for agg in ("grm", "ssc", "none"):
        model = recall_model(agg)
        batch = mqar_batches(1)[0]
        with Watch() as w:
            loss, metrics = mqar_loss("torch", None)(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        bad = sorted(op for op in w.seen if any(b in op for b in banned))
        assert not bad, (agg, bad)
        assert any("linalg_solve_triangular" in op for op in w.seen)  # the watch saw the core


def test_cuda_graph_choice():
    assert use_graph("auto", CPU) is False and use_graph("off", torch.device("cuda")) is False
    assert use_graph("auto", torch.device("cuda")) is True
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        use_graph("on", CPU)
