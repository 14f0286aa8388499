"""Evaluation results (scripts/eval.py's JSON) as markdown tables and a recall plot."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    models = results["models"]
    lines = ["| model | aggregation (served) | params | steps | held-out ppl | bits/byte | sample ppl | recall % (all) "
             "| recall sequences / queries |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        h = m.get("heldout") or {}
        ppl = f"{h['ppl']:.2f}" if "ppl" in h else "-"
        bpb = f"{h['bpb']:.3f}" if "bpb" in h else "-"
        sample = f"{m['sample_ppl']:.2f}" if m.get("sample_ppl") is not None else "-"
        r = m.get("recall") or {}
        steps = (m.get("training") or {}).get("steps") or "-"
        lines.append(f"| {name} | {m['served_aggregation']} | {m['params'] / 1e6:.2f}M | {steps} | {ppl} | {bpb} "
                     f"| {sample} | {_pct(r.get('overall'))} | {r.get('sequences', '-')} / {r.get('queries', '-')} |")
    with_recall = {n: m["recall"] for n, m in models.items() if m.get("recall")}
    if with_recall:
        first = next(iter(with_recall.values()))
        lines += ["", "Recall accuracy (%) by number of key-value pairs (all gaps together):", "",
                  "| model | " + " | ".join(str(n) for n in first["n_pairs"]) + " |",
                  "|---|" + "---|" * len(first["n_pairs"])]
        lines += [f"| {n} | " + " | ".join(_pct(x) for x in r["by_pairs"]) + " |" for n, r in with_recall.items()]
        lines += ["", "Recall accuracy (%) by filler tokens between the pairs and the queries (all pair counts):", "",
                  "| model | " + " | ".join(str(g) for g in first["gaps"]) + " |",
                  "|---|" + "---|" * len(first["gaps"])]
        lines += [f"| {n} | " + " | ".join(_pct(x) for x in r["by_gap"]) + " |" for n, r in with_recall.items()]
        edges = first["distance_edges"]
        bins = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        lines += ["", "Recall accuracy (%) by distance in tokens from a pair to its query:", "",
                  "| model | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
        lines += [f"| {n} | " + " | ".join(_pct(x) if c else "-" for x, c in
                                          zip(r["by_distance"], r["distance_count"], strict=True)) + " |"
                  for n, r in with_recall.items()]
        for n, r in with_recall.items():
            lines += ["", f"`{n}`: recall % by pairs (rows) x gap (columns)", "",
                      "| pairs | " + " | ".join(str(g) for g in r["gaps"]) + " |", "|---|" + "---|" * len(r["gaps"])]
            lines += [f"| {p} | " + " | ".join(_pct(x) for x in row) + " |" for p, row in zip(r["n_pairs"], r["grid"],
                                                                                            strict=True)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> bool:
    """Recall curves (by pairs, by gap, by distance) per model into a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = {n: m["recall"] for n, m in results["models"].items() if m.get("recall")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in curves.items():
        style = dict(marker="o", label=name, linestyle="--" if "-as-" in name else "-")
        axes[0].plot(r["n_pairs"], [_nan(x) for x in r["by_pairs"]], **style)
        axes[1].plot(r["gaps"], [_nan(x) for x in r["by_gap"]], **style)
        edges = r["distance_edges"]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        pts = [(m, x) for m, x, c in zip(mids, r["by_distance"], r["distance_count"], strict=True) if c]
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], **style)
    for ax, xlabel in zip(axes, ("key-value pairs", "filler tokens between pairs and queries",
                                 "distance pair -> query (tokens)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(0, 1.02)
        if ax is not axes[1]:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Associative recall through the serving path (teacher-forced argmax at each query)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x
