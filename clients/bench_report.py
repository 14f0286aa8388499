"""Per-request measurements of a load run and their summary (percentiles, throughput, errors).

Latencies are client-side: TTFT runs from sending the request to the first chunk that carries text;
ITL is the gap between successive text chunks (mcserve sends one chunk per engine delta, usually one
token); TPOT is a request's (e2e - TTFT) / (output tokens - 1), vLLM's definition; e2e runs to the end
of the stream. Token counts come from the server's `usage`. Goodput counts the successful requests that
met every SLO given (TTFT, TPOT, e2e limits in ms), per second.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

QUANTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request. `status`: "200" when it succeeded, else the HTTP status ("429", "503", ...) or one
    of "stream_error" (an error event mid-stream), "timeout", "connection", "cancelled"."""

    conversation: int
    turn: int
    start_s: float  # since the start of the run
    status: str
    e2e_s: float
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None
    chunks: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "200"

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def meets(self, slos_ms: dict[str, float]) -> bool:
        values = {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2e": self.e2e_s}
        return self.ok and all(values[m] is not None and values[m] * 1000 <= limit for m, limit in slos_ms.items())


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _key(q: float) -> str:
    return f"p{q:g}"


def distribution(values: list[float], quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float | int]:
    out: dict[str, float | int] = {_key(q): percentile(values, q) for q in quantiles}
    out["mean"] = sum(values) / len(values) if values else math.nan
    out["count"] = len(values)
    return out


def summarize(
    records: list[RequestRecord],
    wall_s: float,
    quantiles: tuple[float, ...] = QUANTILES,
    slos_ms: dict[str, float] | None = None,
) -> dict:
    """Plain-data summary of a run that took `wall_s` seconds (JSON-ready except NaN for empty sets)."""
    assert wall_s > 0, wall_s
    ok = [r for r in records if r.ok]
    errors = Counter(r.status for r in records if not r.ok)
    completion = sum(r.completion_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    with_cache = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in with_cache)
    cache_prompt = sum(r.prompt_tokens or 0 for r in with_cache)
    out = {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "output_tokens_per_s": completion / wall_s,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached if with_cache else None,
        "cached_fraction": cached / cache_prompt if cache_prompt else None,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None], quantiles),
        "tpot_s": distribution([t for r in ok if (t := r.tpot_s) is not None], quantiles),
        "itl_s": distribution([x for r in ok for x in r.itl_s], quantiles),
        "e2e_s": distribution([r.e2e_s for r in ok], quantiles),
        "quantiles": list(quantiles),
    }
    if slos_ms:
        good = sum(1 for r in records if r.meets(slos_ms))
        out["goodput"] = {"slos_ms": dict(slos_ms), "requests": good, "requests_per_s": good / wall_s}
    turns = sorted({r.turn for r in ok})
    if len(turns) > 1:
        out["per_turn"] = [_turn_row(t, [r for r in ok if r.turn == t]) for t in turns]
    return out


def _turn_row(turn: int, rs: list[RequestRecord]) -> dict:
    prompt = sum(r.prompt_tokens or 0 for r in rs)
    cached = sum(r.cached_tokens or 0 for r in rs if r.cached_tokens is not None)
    return {
        "turn": turn,
        "requests": len(rs),
        "mean_prompt_tokens": prompt / len(rs),
        "ttft_p50_s": percentile([r.ttft_s for r in rs if r.ttft_s is not None], 50),
        "cached_fraction": cached / prompt if prompt else None,
    }


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1000 * x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(summary: dict) -> str:
    """The summary as markdown tables."""
    s = summary
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    lines = [
        "| requests | ok | errors | duration | req/s | output tok/s | prompt tok | cached tok |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['ok']} | {errors} | {s['duration_s']:.2f} s | {s['request_throughput']:.2f} "
        f"| {s['output_tokens_per_s']:.1f} | {s['prompt_tokens']} "
        f"| {'-' if s['cached_tokens'] is None else s['cached_tokens']} ({_pct(s['cached_fraction'])}) |",
        "",
    ]
    qs = [_key(q) for q in s.get("quantiles", QUANTILES)]
    lines += [
        "| latency (ms) | " + " | ".join(qs) + " | mean | n |",
        "|---|" + "---:|" * (len(qs) + 2),
    ]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "e2e")):
        if key not in s:
            continue
        d = s[key]
        cells = " | ".join(_ms(d[k]) for k in [*qs, "mean"])
        lines.append(f"| {name} | {cells} | {d['count']} |")
    if "goodput" in s:
        g = s["goodput"]
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in g["slos_ms"].items())
        lines += ["", f"goodput ({slos}): {g['requests']} requests, {g['requests_per_s']:.2f} req/s"]
    if "per_turn" in s:
        lines += ["", "| turn | requests | mean prompt tok | TTFT p50 (ms) | cached |", "|---:|---:|---:|---:|---:|"]
        for t in s["per_turn"]:
            lines.append(
                f"| {t['turn']} | {t['requests']} | {t['mean_prompt_tokens']:.0f} | {_ms(t['ttft_p50_s'])} "
                f"| {_pct(t['cached_fraction'])} |"
            )
    return "\n".join(lines)
