"""Recall accuracy of MQAR models through the serving path, as tables and curves.

Accuracy is teacher-forced: at each query key the served model's next-token argmax must be the
value. It goes through `model.prefill` (evaluation.serving_logits), exactly what `mcserve serve`
computes, so a checkpoint served as `ssc` or `none` is measured as a user would run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mctrain.evaluation import serving_logits
from mctrain.mqar import MQARSeq

DISTANCE_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024)


def accuracy(model: MCGatedDeltaNetForCausalLM, suite: list[tuple[int, MQARSeq]],
             distance_edges: tuple[int, ...] = DISTANCE_EDGES) -> dict:
    """Accuracy by number of pairs and by distance bin (`distance_edges`, the last bin closed)."""
    hits: dict[int, list[int]] = {}
    d_hits = np.zeros(len(distance_edges) - 1)
    d_count = np.zeros(len(distance_edges) - 1)
    for n, seq in suite:
        lg = serving_logits(model, seq.ids)
        pred = lg[torch.as_tensor(seq.query_pos, device=lg.device)].argmax(-1).cpu().numpy()
        ok = pred == seq.answers
        h = hits.setdefault(n, [0, 0])
        h[0] += int(ok.sum())
        h[1] += len(ok)
        b = np.clip(np.searchsorted(distance_edges, seq.distance, side="right") - 1, 0, len(distance_edges) - 2)
        np.add.at(d_hits, b, ok)
        np.add.at(d_count, b, 1)
    ns = sorted(hits)
    return dict(n_pairs=ns, by_pairs=[hits[n][0] / hits[n][1] for n in ns], queries_by_pairs=[hits[n][1] for n in ns],
                distance_edges=list(distance_edges),
                by_distance=[float(h / c) if c else None for h, c in zip(d_hits, d_count, strict=True)],
                distance_count=d_count.astype(int).tolist(),
                overall=float(d_hits.sum() / max(d_count.sum(), 1)), sequences=len(suite))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """Tables by pairs and by distance, one row per served model."""
    rows = results["models"]
    first = next(iter(rows.values()))["recall"]
    edges = first["distance_edges"]
    bins = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    lines = ["Recall accuracy (%) by number of key-value pairs:", "",
             "| model | served as | " + " | ".join(str(n) for n in first["n_pairs"]) + " | all |",
             "|---|---|" + "---|" * (len(first["n_pairs"]) + 1)]
    lines += [f"| {name} | {m['served_aggregation']} | " + " | ".join(_pct(x) for x in m["recall"]["by_pairs"])
              + f" | {_pct(m['recall']['overall'])} |" for name, m in rows.items()]
    lines += ["", "Recall accuracy (%) by distance in tokens from a pair to its query (all pair counts):", "",
              "| model | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
    lines += [f"| {name} | " + " | ".join(_pct(x) for x in m["recall"]["by_distance"]) + " |"
              for name, m in rows.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path, title: str) -> bool:
    """Accuracy vs pairs and vs distance per served model into a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for name, m in results["models"].items():
        r = m["recall"]
        style = dict(marker="o", label=name, linestyle="--" if "-as-" in name else "-")
        axes[0].plot(r["n_pairs"], r["by_pairs"], **style)
        edges = r["distance_edges"]
        pts = [((a + b) / 2, x) for a, b, x, c in zip(edges[:-1], edges[1:], r["by_distance"], r["distance_count"],
                                                       strict=True) if c]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], **style)
    dk = results.get("settings", {}).get("head_dim")
    if dk:
        axes[0].axvline(dk, color="grey", linewidth=0.8, linestyle=":")
        axes[0].text(dk, 0.02, f" dk = {dk}", color="grey", fontsize=8)
    for ax, xlabel in zip(axes, ("key-value pairs in the sequence", "distance pair -> query (tokens)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
