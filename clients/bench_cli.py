"""`mcserve-bench`: flags, progress bar, the result file (with metadata) and the optional plot.

    mcserve-bench -c 16 -n 200 --prompt-len 64:512 --output-len 128 --percentiles 50,90,99,99.9
    mcserve-bench --turns 8 --session -c 8 -n 64 --shared-prefix 200 --num-prefixes 4
    mcserve-bench --dataset sharegpt.json --goodput ttft:500,tpot:50 --plot
    mcserve-bench --url http://vllm:8000 --tokenizer /models/x/tokenizer.json --no-ignore-eos

Every run writes `RESULT_DIR/<UTC time>-<label>.json` (never overwriting: a new name each run) with
the summary, every request's record and metadata: the server's /version, the command line, the
resolved configuration, start and end times. `--plot` adds a PNG beside it (needs matplotlib: the
`clients` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from pathlib import Path

import httpx

from mcserve.clients.bench_report import markdown
from mcserve.clients.loadgen import LoadGenError, LoadResult, run_load
from mcserve.clients.tokens import TokenizerError
from mcserve.clients.workload import ENDPOINTS, MAX_DURATION_S, MAX_REQUESTS, LengthDist, LoadConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mcserve-bench",
        description="Benchmark an OpenAI-compatible server with concurrent streaming clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    ap.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    ap.add_argument("--concurrency", "-c", type=int, default=8, help="streaming clients (requests in flight)")
    ap.add_argument(
        "--requests",
        "-n",
        type=int,
        default=None,
        help=f"requests in all (default 64, or {MAX_REQUESTS} with --duration)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds after which no request starts (default {MAX_DURATION_S / 24:g})",
    )
    ap.add_argument("--rate", type=float, default=None, help="Poisson request rate per second (default: closed loop)")
    ap.add_argument("--prompt-len", default="128", help="tokens per user message: 128, 64:256, normal:128:32, exp:128")
    ap.add_argument(
        "--output-len", default=None, help="max_tokens per request, same forms (default 64; a dataset's reply lengths)"
    )
    ap.add_argument("--turns", type=int, default=1, help="turns per conversation (history is resent each turn)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens of random text common to a conversation group")
    ap.add_argument(
        "--num-prefixes", type=int, default=1, help="different shared prefixes (conversation k gets k mod N)"
    )
    ap.add_argument("--prefix-text", default="", help="literal text at the start of every request")
    ap.add_argument(
        "--tokenizer",
        default="auto",
        help="lengths in tokens of: auto (server, else words), server, words, or a tokenizer.json",
    )
    ap.add_argument(
        "--dataset", default=None, help="JSONL of {'prompt': ...} or ShareGPT-style conversations (JSON or JSONL)"
    )
    ap.add_argument("--dataset-format", choices=("auto", "jsonl", "sharegpt"), default="auto")
    ap.add_argument(
        "--session", action="store_true", help="send a session id per conversation (X-Session-Id header + session_id)"
    )
    ap.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (for servers that reject vLLM's extras)",
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percentiles", default="50,90,99", help="latency percentiles to report")
    ap.add_argument("--goodput", default="", help="SLOs in ms for goodput, e.g. ttft:500,tpot:50,e2e:10000")
    ap.add_argument("--result-dir", default="bench-results", help="folder of the timestamped result files")
    ap.add_argument("--label", default=None, help="name part of the result file (default: the model)")
    ap.add_argument(
        "--output", "-o", default=None, help="write the result to this file instead ('' for none); never overwritten"
    )
    ap.add_argument("--plot", action="store_true", help="also write a PNG of the latencies (needs matplotlib)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def _slos(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        metric, _, value = part.partition(":")
        try:
            out.append((metric.strip(), float(value)))
        except ValueError:
            raise ValueError(f"cannot read goodput SLO {part!r} (e.g. ttft:500)") from None
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    requests = args.requests if args.requests is not None else (64 if args.duration is None else MAX_REQUESTS)
    try:
        percentiles = tuple(float(q) for q in args.percentiles.split(",") if q.strip())
    except ValueError:
        raise ValueError(f"cannot read percentiles {args.percentiles!r} (e.g. 50,90,99)") from None
    return LoadConfig(
        url=args.url,
        api_key=args.api_key,
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        max_requests=requests,
        duration_s=args.duration if args.duration is not None else MAX_DURATION_S / 24,
        rate=args.rate,
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len or "64"),
        turns=args.turns,
        shared_prefix_len=args.shared_prefix,
        prefix_text=args.prefix_text,
        session_ids=args.session,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        num_prefixes=args.num_prefixes,
        tokenizer=args.tokenizer,
        dataset=args.dataset,
        dataset_format=args.dataset_format,
        output_len_given=args.output_len is not None,
        percentiles=percentiles,
        goodput_slos_ms=_slos(args.goodput),
    )


def result_path(result_dir: str, label: str, now: dt.datetime) -> Path:
    """A new file name: `<UTC time>-<label>.json`, with -2, -3... if that exists."""
    folder = Path(result_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = now.strftime("%Y%m%dT%H%M%SZ") + "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "run")
    path, k = folder / f"{stem}.json", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.json", k + 1
    return path


def write_plot(result: LoadResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'mcserve[clients]'") from None
    ok = [r for r in result.records if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in (
        ("TTFT", [r.ttft_s for r in ok if r.ttft_s is not None]),
        ("TPOT", [t for r in ok if (t := r.tpot_s) is not None]),
        ("e2e", [r.e2e_s for r in ok]),
    ):
        xs = sorted(1000 * v for v in values)
        if xs:
            axes[0].plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    axes[0].set(xscale="log", xlabel="ms", ylabel="fraction of requests", title="latency CDF")
    axes[0].legend()
    turns = sorted({r.turn for r in ok})
    ttft_by_turn = [[1000 * r.ttft_s for r in ok if r.turn == t and r.ttft_s is not None] for t in turns]
    axes[1].boxplot(ttft_by_turn, positions=[t + 1 for t in turns], widths=0.6)
    axes[1].set(xlabel="turn", ylabel="TTFT (ms)", title="TTFT by turn")
    fig.suptitle(f"{result.model}: {len(ok)}/{len(result.records)} ok, {result.wall_s:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    source = f"dataset {cfg.dataset}" if cfg.dataset else f"prompt {cfg.prompt_len.describe()} tokens"
    print(
        f"mcserve-bench: {cfg.base_url} {cfg.endpoint}, {cfg.concurrency} clients, at most {cfg.max_requests} "
        f"requests / {cfg.duration_s:g} s, {source}, output {cfg.output_len.describe()} tokens, {cfg.turns} turn(s)"
        + (f", {cfg.rate:g} req/s" if cfg.rate else ""),
        file=sys.stderr,
    )
    started = dt.datetime.now(dt.timezone.utc)
    from tqdm import tqdm

    total = None if cfg.max_requests >= MAX_REQUESTS else cfg.max_requests
    with tqdm(total=total, unit="req", disable=not args.progress, file=sys.stderr, leave=False) as bar:
        try:
            result = asyncio.run(run_load(cfg, on_record=lambda _r: bar.update(1)))
        except (LoadGenError, TokenizerError, httpx.HTTPError, ValueError, OSError) as e:
            print(f"mcserve-bench: {e}", file=sys.stderr)
            return 2
    finished = dt.datetime.now(dt.timezone.utc)
    print(f"model {result.model} (server version {result.server_version or 'unknown'}, tokens: {result.tokenizer})\n")
    print(markdown(result.summary()))
    if args.output == "":
        return 0
    if args.output is not None:
        path = Path(args.output)
        if path.exists():
            print(f"mcserve-bench: {path} exists; not overwritten", file=sys.stderr)
            return 2
    else:
        path = result_path(args.result_dir, args.label or result.model, started)
    data = result.as_json()
    data["metadata"] = {
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "server": {"url": cfg.base_url, "version": result.server_version},
        "tokenizer": result.tokenizer,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
    if args.plot:
        write_plot(result, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
